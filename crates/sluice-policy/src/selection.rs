//! Backend selection for one request: which backend each attempt goes to,
//! and what happens after an attempt fails (another backend, the gateway's
//! own 429/503, or the backend's answer as it is).
//!
//! The decisions come from `sluice-routing` (pools, breakers, steering);
//! this type ties them to an API's config, the request context (where every
//! attempt is recorded) and the metrics. The proxy asks it and does the I/O.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use sluice_config::{Config, Failover};
use sluice_limits::Clock;
use sluice_routing::{
    BackendHealth, BreakerView, CallKind, Choice, Member, Need, Outcome, Pool, TripCause,
};

use crate::GatewayError;
use crate::context::RequestContext;

/// One attempt at a backend, kept on the request's context (for traces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Index of the backend (`Config::backends` order).
    pub backend: usize,
    /// It was the half-open breaker's probe.
    pub probe: bool,
    /// A backend ahead of it was skipped because its headroom could not
    /// fit the request.
    pub steered: bool,
    /// When it started.
    pub started: Instant,
    /// How long it took to its outcome (zero while open).
    pub duration: Duration,
    /// How it ended; `None` while it is still going (or the client left).
    pub outcome: Option<Outcome>,
    /// The breaker rule this outcome tripped, if it did.
    pub tripped: Option<TripCause>,
    /// The request went on to another backend after it.
    pub failed_over: bool,
    /// Counted in its backend's in-flight gauge.
    in_flight: bool,
    /// When its breaker admitted it as the probe (monotonic), if it is one.
    probe_admitted: Option<Duration>,
    /// It repeats the attempt before on the same backend, whose pooled
    /// connection had gone stale.
    pub stale_retry: bool,
    /// It went to its backend without the breaker's say (a call pinned to
    /// the owner of its object, or seeking it): its outcome counts against
    /// the breaker only while the breaker is closed, so it can neither
    /// close a half-open breaker nor free its probe slot.
    pub bypassed: bool,
}

/// Routing state of one request. Written by the selector; read by the
/// proxy (the body can be replayed) and traces (the attempts).
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// Index of the pool the request goes to.
    pub pool: Option<usize>,
    /// How the call may be retried.
    pub kind: Option<CallKind>,
    /// What the request needs (tokens), for steering.
    pub need: Need,
    /// Every attempt so far, in order. Most requests make one: it is kept
    /// in place, without an allocation.
    pub attempts: smallvec::SmallVec<[Attempt; 1]>,
    /// The backend chosen for the next attempt after a failure, and when
    /// (monotonic) it was chosen.
    pub planned: Option<(Choice, Duration)>,
    /// When routing began (the body, if any, was read): the failover time
    /// budget runs from here.
    pub started: Option<Instant>,
    /// The planned attempt repeats the last one on the same backend after a
    /// stale pooled connection.
    repeat_planned: bool,
    /// The request names an object a backend owns (a response, a file...).
    pub affinity: Option<Affinity>,
}

/// How a call that names a backend-owned object is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// The owner is known: every attempt goes to this backend, and a failure
    /// is never moved to another one (the object is not there).
    Pinned(usize),
    /// The owner is not known (a restart, another replica): the API's
    /// backends are asked in turn until one answers other than 404.
    Seek,
}

impl Routing {
    /// Backends tried so far.
    pub fn tried(&self) -> sluice_routing::Members {
        self.attempts.iter().map(|a| a.backend).collect()
    }

    /// Attempts that count against `failover.max_attempts`: a repeat on
    /// the same backend after a stale pooled connection does not.
    fn counted_attempts(&self) -> usize {
        self.attempts.iter().filter(|a| !a.stale_retry).count()
    }
}

/// What to do once an attempt has failed or answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// Give the client this attempt's answer (or error) as it is.
    Deliver,
    /// Send the request again: the next backend is planned.
    Retry,
    /// Answer with the gateway's own error (every backend resting).
    Refuse(GatewayError),
}

/// An API's routing settings, resolved to indices.
#[derive(Debug)]
struct ApiRouting {
    pool: usize,
    /// Every backend the API reaches, in config order (seeking an owner).
    backends: Vec<usize>,
    deployment_pools: HashMap<String, usize>,
    failover: Failover,
}

/// The state shown for one backend in `GET /backends`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendStatus {
    pub name: String,
    pub region: String,
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    /// Seconds left to rest (open only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_for_seconds: Option<f64>,
    /// Why it is open: the rule, the outcome that tripped it and any
    /// Retry-After the backend gave (seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_because: Option<serde_json::Value>,
    /// A half-open breaker's probe is out.
    pub probing: bool,
    /// The last rate-limit headroom it reported, while it counts.
    pub remaining_tokens: Option<u64>,
    pub remaining_requests: Option<u64>,
    /// Seconds until that reading stops counting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headroom_expires_in_seconds: Option<f64>,
    /// Requests in flight to it now.
    pub in_flight: usize,
}

/// Metrics of routing.
#[derive(Debug, Clone)]
struct RoutingMetrics {
    attempts: IntCounterVec,
    /// `attempts` with outcome `200`, per backend, resolved once: the
    /// common case costs no label lookup.
    ok_attempts: Vec<prometheus::IntCounter>,
    failovers: IntCounterVec,
    trips: IntCounterVec,
    exhausted: IntCounterVec,
    breaker_state: IntGaugeVec,
    in_flight: IntGaugeVec,
}

impl RoutingMetrics {
    fn new(registry: &Registry, backends: &[String]) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["backend"])?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let attempts = counter(
            "sluice_backend_attempts_total",
            "Attempts sent to a backend, by backend and outcome (status code, connect_failed, timeout, connection_lost)",
            &["backend", "outcome"],
        )?;
        Ok(RoutingMetrics {
            ok_attempts: backends
                .iter()
                .map(|b| attempts.with_label_values(&[b.as_str(), "200"]))
                .collect(),
            attempts,
            failovers: counter(
                "sluice_failovers_total",
                "Requests sent on to another backend after an attempt failed, by the backend that failed and its outcome",
                &["backend", "outcome"],
            )?,
            trips: counter(
                "sluice_breaker_trips_total",
                "Times a backend's circuit breaker opened, by backend and rule",
                &["backend", "rule"],
            )?,
            exhausted: counter(
                "sluice_pool_exhausted_total",
                "Requests answered by the gateway because every backend of the pool was resting",
                &["pool"],
            )?,
            breaker_state: gauge(
                "sluice_backend_breaker_state",
                "Circuit breaker state per backend: 0 closed, 1 open, 2 half-open",
            )?,
            in_flight: gauge(
                "sluice_backend_in_flight",
                "Requests in flight to each backend",
            )?,
        })
    }
}

/// How many times one request may be repeated on the same backend after a
/// pooled connection turned out stale ([`BackendSelector::retry_same`]).
pub const MAX_STALE_RETRIES: usize = 2;

/// Chooses backends for requests: the pools, each backend's breaker and
/// headroom, and the failover rules of every API.
#[derive(Debug)]
pub struct BackendSelector {
    clock: Arc<dyn Clock>,
    /// Backend names and regions, by index.
    names: Vec<(String, String)>,
    health: Vec<BackendHealth>,
    pools: Vec<Pool>,
    apis: Vec<ApiRouting>,
    metrics: RoutingMetrics,
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
fn retry_after_seconds(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

impl BackendSelector {
    /// Build from a validated config. Metrics go to `registry`.
    pub fn new(cfg: &Config, clock: Arc<dyn Clock>, registry: &Registry) -> Result<Self, String> {
        let index: HashMap<&str, usize> = cfg
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.name.as_str(), i))
            .collect();
        let pools = cfg
            .pools
            .iter()
            .map(|p| {
                let members = p
                    .members
                    .iter()
                    .map(|m| {
                        index
                            .get(m.backend.as_str())
                            .map(|&backend| Member {
                                backend,
                                priority: m.priority,
                                weight: m.weight,
                            })
                            .ok_or_else(|| {
                                format!("pool '{}' names unknown backend '{}'", p.name, m.backend)
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Pool::new(
                    p.name.clone(),
                    members,
                    p.steering,
                    p.headroom_max_age,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let pool_index = |name: &str| {
            cfg.pools
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| format!("unknown pool '{name}'"))
        };
        let apis = cfg
            .apis
            .iter()
            .map(|a| {
                Ok(ApiRouting {
                    pool: pool_index(&a.pool)?,
                    backends: a
                        .backends
                        .iter()
                        .filter_map(|b| index.get(b.as_str()).copied())
                        .collect(),
                    deployment_pools: a
                        .deployment_pools
                        .iter()
                        .map(|(d, p)| Ok((d.clone(), pool_index(p)?)))
                        .collect::<Result<_, String>>()?,
                    failover: a.failover,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let names: Vec<String> = cfg.backends.iter().map(|b| b.name.clone()).collect();
        let metrics = RoutingMetrics::new(registry, &names).map_err(|e| e.to_string())?;
        Ok(BackendSelector {
            clock,
            names: cfg
                .backends
                .iter()
                .map(|b| (b.name.clone(), b.region.clone()))
                .collect(),
            health: cfg
                .backends
                .iter()
                .map(|b| BackendHealth::new(b.breaker_rules.clone()))
                .collect(),
            pools,
            apis,
            metrics,
        })
    }

    fn now(&self) -> Duration {
        self.clock.monotonic()
    }

    /// The name of backend `i`.
    pub fn backend_name(&self, i: usize) -> &str {
        self.names.get(i).map(|n| n.0.as_str()).unwrap_or("backend")
    }

    /// The largest number of attempts any API may make (pingora's own
    /// retry limit is set from it).
    pub fn max_attempts(&self) -> usize {
        // A call seeking the owner of its object may ask every backend of
        // its API once.
        self.apis
            .iter()
            .map(|a| self.attempt_limit(a).max(a.backends.len()))
            .max()
            .unwrap_or(1)
    }

    fn attempt_limit(&self, api: &ApiRouting) -> usize {
        let pool_size = std::iter::once(api.pool)
            .chain(api.deployment_pools.values().copied())
            .filter_map(|p| self.pools.get(p))
            .map(|p| p.members().count())
            .max()
            .unwrap_or(1);
        api.failover
            .max_attempts
            .map_or(pool_size, |n| n as usize)
            .max(1)
    }

    /// Start routing a request to API `api`: the pool for its deployment,
    /// how it may be retried, and the tokens it needs.
    pub fn begin(
        &self,
        ctx: &mut RequestContext,
        api: usize,
        method: &str,
        rest_path: &str,
        need_tokens: Option<u64>,
    ) {
        let path_deployment = crate::route::deployment_of(rest_path);
        let kind = sluice_routing::call_kind(method, rest_path);
        self.begin_with(ctx, api, kind, path_deployment, need_tokens);
    }

    /// [`begin`](Self::begin), for a caller that already has the path's
    /// deployment ([`crate::route::deployment_of`] of the path) and the
    /// call's kind ([`sluice_routing::call_kind`] of method and path).
    pub fn begin_with(
        &self,
        ctx: &mut RequestContext,
        api: usize,
        kind: CallKind,
        path_deployment: Option<&str>,
        need_tokens: Option<u64>,
    ) {
        let Some(a) = self.apis.get(api) else { return };
        // The path's deployment, else (v1 API) the body's `model`.
        let pool = path_deployment
            .or(ctx.deployment.as_deref())
            .and_then(|d| a.deployment_pools.get(d).copied())
            .unwrap_or(a.pool);
        ctx.routing = Routing {
            pool: Some(pool),
            kind: Some(kind),
            need: Need {
                tokens: need_tokens,
            },
            attempts: smallvec::SmallVec::new(),
            planned: None,
            started: Some(Instant::now()),
            repeat_planned: false,
            affinity: None,
        };
    }

    /// Route the request begun with [`begin`](Self::begin) to the owner of
    /// the object it names: `Some(backend)` when known, `None` to seek it.
    ///
    /// An owner the request's API does not reach is not used: the request
    /// seeks among its own API's backends instead (an id never opens
    /// another API's backends).
    pub fn set_affinity(&self, ctx: &mut RequestContext, owner: Option<usize>) {
        let reaches = |b: usize| {
            ctx.api
                .and_then(|a| self.apis.get(a))
                .is_some_and(|api| api.backends.contains(&b))
        };
        ctx.routing.affinity = Some(match owner {
            Some(b) if reaches(b) => Affinity::Pinned(b),
            _ => Affinity::Seek,
        });
    }

    /// A backend of the API not asked yet, for a request seeking the owner
    /// of the object it names.
    /// Backends whose breaker would let a request through now come first.
    fn next_to_seek(&self, ctx: &RequestContext) -> Option<usize> {
        let api = ctx.api.and_then(|a| self.apis.get(a))?;
        let tried = ctx.routing.tried();
        let now = self.now();
        let mut untried = api.backends.iter().copied().filter(|b| !tried.contains(b));
        let first = untried.clone().next()?;
        Some(
            untried
                .find(|&b| self.health.get(b).is_some_and(|h| h.breaker.available(now)))
                .unwrap_or(first),
        )
    }

    /// What is left of the API's failover time for the next attempt; `None`
    /// for the first attempt, which always gets its backend's whole connect
    /// budget.
    pub fn failover_left(&self, ctx: &RequestContext) -> Option<Duration> {
        let api = ctx.api.and_then(|a| self.apis.get(a))?;
        if ctx.routing.attempts.len() <= 1 {
            return None;
        }
        let started = ctx.routing.started.unwrap_or(ctx.started);
        Some(api.failover.timeout.saturating_sub(started.elapsed()))
    }

    /// The backend for the next attempt, recorded on the context; or the
    /// gateway's answer when every backend of the pool is resting.
    pub fn next_backend(&self, ctx: &mut RequestContext) -> Result<usize, GatewayError> {
        let pool = ctx.routing.pool.unwrap_or(0);
        // Every attempt of a pinned call, and every seeking attempt after
        // the first, goes where affinity says.
        let mut bypassed = match ctx.routing.affinity {
            Some(Affinity::Pinned(_)) => true,
            Some(Affinity::Seek) => !ctx.routing.attempts.is_empty(),
            None => false,
        };
        let (choice, chosen_at) = match (ctx.routing.planned.take(), ctx.routing.affinity) {
            (Some(planned), _) => planned,
            // The owner takes it whatever its breaker says: no other
            // backend has the object.
            (None, Some(Affinity::Pinned(backend))) => (
                Choice::Backend {
                    backend,
                    probe: false,
                    steered: false,
                },
                self.now(),
            ),
            (None, affinity) => {
                // One reading of the clock for the choice and its time.
                let now = self.now();
                match self.choose_at(ctx, pool, now) {
                    // Seeking an owner: when the pool has no one to offer now,
                    // another backend of the API is asked (it may be the owner).
                    Choice::Exhausted { .. }
                        if affinity == Some(Affinity::Seek)
                            && let Some(backend) = self.next_to_seek(ctx) =>
                    {
                        bypassed = true;
                        let choice = Choice::Backend {
                            backend,
                            probe: false,
                            steered: false,
                        };
                        (choice, self.now())
                    }
                    choice => (choice, now),
                }
            }
        };
        match choice {
            Choice::Backend {
                backend,
                probe,
                steered,
            } => {
                if let Some(h) = self.health.get(backend) {
                    h.in_flight
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                ctx.routing.attempts.push(Attempt {
                    backend,
                    probe,
                    steered,
                    started: Instant::now(),
                    duration: Duration::ZERO,
                    outcome: None,
                    tripped: None,
                    failed_over: false,
                    in_flight: true,
                    probe_admitted: probe.then_some(chosen_at),
                    stale_retry: std::mem::take(&mut ctx.routing.repeat_planned),
                    bypassed,
                });
                ctx.backend = Some(backend);
                Ok(backend)
            }
            Choice::Exhausted { .. } => Err(self.exhausted(ctx, pool)),
        }
    }

    /// The pool's choice for the request's next attempt, at `now` (the
    /// clock as the caller read it).
    fn choose_at(&self, ctx: &RequestContext, pool: usize, now: Duration) -> Choice {
        let Some(p) = self.pools.get(pool) else {
            return Choice::Exhausted { retry_after: None };
        };
        // Most choices are a request's first: nothing tried, nothing to collect.
        let tried_before;
        let tried: &[usize] = if ctx.routing.attempts.is_empty() {
            &[]
        } else {
            tried_before = ctx.routing.tried();
            &tried_before
        };
        sluice_routing::select(p, &self.health, ctx.routing.need, tried, now)
    }

    /// Whether a member of the pool not in `tried` would let a request
    /// through now (without taking a probe slot).
    fn any_available(&self, pool: usize, tried: &[usize]) -> bool {
        let now = self.now();
        self.pools.get(pool).is_some_and(|p| {
            p.members().any(|m| {
                !tried.contains(&m.backend)
                    && self
                        .health
                        .get(m.backend)
                        .is_some_and(|h| h.breaker.available(now))
            })
        })
    }

    /// The shortest rest left among the pool's resting backends.
    fn shortest_rest(&self, pool: usize) -> Option<Duration> {
        let now = self.now();
        self.pools
            .get(pool)?
            .members()
            .filter_map(|m| self.health.get(m.backend)?.breaker.open_until(now))
            .map(|until| until.saturating_sub(now))
            .min()
    }

    /// The gateway's answer when no backend can take the request.
    fn exhausted(&self, ctx: &RequestContext, pool: usize) -> GatewayError {
        let name = self.pools.get(pool).map(Pool::name).unwrap_or("pool");
        self.metrics.exhausted.with_label_values(&[name]).inc();
        let rest = self.shortest_rest(pool).unwrap_or(Duration::from_secs(1));
        let secs = retry_after_seconds(rest);
        let status = ctx
            .api
            .and_then(|a| self.apis.get(a))
            .map_or(429, |a| a.failover.when_exhausted);
        let err = if status == 503 {
            GatewayError::new(
                503,
                format!(
                    "Backend pool {name} is temporarily unavailable: every backend is resting. Try again in {secs} seconds."
                ),
            )
        } else {
            GatewayError::new(
                429,
                format!(
                    "Every backend of pool {name} is busy or failing. Try again in {secs} seconds."
                ),
            )
        };
        err.with_header("retry-after", secs.to_string())
            .with_header("retry-after-ms", rest.as_millis().max(1).to_string())
    }

    /// The open attempt ended with `outcome`: record it everywhere.
    fn close_attempt(
        &self,
        ctx: &mut RequestContext,
        outcome: Outcome,
        now: Duration,
    ) -> Option<usize> {
        let attempt = ctx.routing.attempts.last_mut()?;
        if attempt.outcome.is_some() {
            return None;
        }
        let backend = attempt.backend;
        attempt.duration = attempt.started.elapsed();
        let name = self.backend_name(backend);
        match (&outcome, self.metrics.ok_attempts.get(backend)) {
            (Outcome::Status { status: 200, .. }, Some(ok)) => ok.inc(),
            _ => self
                .metrics
                .attempts
                .with_label_values(&[name, &outcome.label()])
                .inc(),
        }
        if let Some(h) = self.health.get(backend) {
            let counts = !attempt.bypassed || matches!(h.breaker.view(now), BreakerView::Closed);
            let tripped = if counts {
                h.breaker.record(&outcome, now)
            } else {
                None
            };
            if let Some(cause) = &tripped {
                self.metrics
                    .trips
                    .with_label_values(&[name, &cause.rule])
                    .inc();
                tracing::info!(
                    backend = name,
                    rule = %cause.rule,
                    outcome = %cause.outcome,
                    "circuit breaker opened"
                );
            }
            attempt.tripped = tripped;
        }
        attempt.outcome = Some(outcome);
        Some(backend)
    }

    /// An attempt's response head arrived with `status` (headers through
    /// `get`, by lowercase name). Records the backend's headroom and breaker
    /// outcome and decides what happens next. `replayable`: the body can
    /// still be sent again and nothing reached the client.
    pub fn after_status<'h>(
        &self,
        ctx: &mut RequestContext,
        status: u16,
        get: impl Fn(&str) -> Option<&'h str> + Copy,
        replayable: bool,
    ) -> After {
        let now = self.now();
        let retry_after = (status == 429 || status >= 500)
            .then(|| sluice_routing::retry_after_from(get, sluice_limits::SystemClock.unix_now()))
            .flatten();
        if let Some(backend) = ctx.routing.attempts.last().map(|a| a.backend)
            && let (Some(h), Some(pool)) = (
                self.health.get(backend),
                ctx.routing.pool.and_then(|p| self.pools.get(p)),
            )
        {
            h.headroom.observe(get, now, pool.headroom_max_age());
            if status == 429
                && let Some(ra) = retry_after
            {
                h.headroom.exhaust(now + ra.min(pool.headroom_max_age()));
            }
        }
        let outcome = Outcome::Status {
            status,
            retry_after,
        };
        self.after(ctx, outcome, replayable, false, now)
    }

    /// An attempt failed without a response head, after the request (or
    /// part of it) may have been sent.
    pub fn after_error(
        &self,
        ctx: &mut RequestContext,
        outcome: Outcome,
        replayable: bool,
    ) -> After {
        self.after(ctx, outcome, replayable, false, self.now())
    }

    /// An attempt failed before anything was sent (no connection, no
    /// address, no token, a connect timeout): the backend surely did not
    /// act, so any call may fail over. The breaker still sees `outcome`.
    pub fn after_connect_error(
        &self,
        ctx: &mut RequestContext,
        outcome: Outcome,
        replayable: bool,
    ) -> After {
        self.after(ctx, outcome, replayable, true, self.now())
    }

    /// `now`: the clock as the caller read it when the outcome arrived.
    fn after(
        &self,
        ctx: &mut RequestContext,
        outcome: Outcome,
        replayable: bool,
        not_sent: bool,
        now: Duration,
    ) -> After {
        // Labelled only for a failover's metric (most outcomes are final).
        let failed = outcome.clone();
        let kind = ctx.routing.kind.unwrap_or(CallKind::Generation);
        let may = if not_sent {
            kind.may_fail_over(&Outcome::ConnectFailed)
        } else {
            kind.may_fail_over(&outcome)
        };
        // Not the owner: a 404, or a 400 (an unknown `previous_response_id`
        // is a 400), or an attempt that never reached the backend.
        let not_here = not_sent
            || matches!(
                outcome,
                Outcome::Status {
                    status: 404 | 400,
                    ..
                }
            );
        let Some(backend) = self.close_attempt(ctx, outcome, now) else {
            return After::Deliver;
        };
        match ctx.routing.affinity {
            Some(Affinity::Pinned(_)) => return After::Deliver,
            Some(Affinity::Seek) => return self.seek_on(ctx, not_here && replayable),
            None => {}
        }
        if !may || !replayable {
            return After::Deliver;
        }
        let Some(api) = ctx.api.and_then(|a| self.apis.get(a)) else {
            return After::Deliver;
        };
        let pool = ctx.routing.pool.unwrap_or(api.pool);
        let started = ctx.routing.started.unwrap_or(ctx.started);
        if ctx.routing.counted_attempts() >= self.attempt_limit(api)
            || started.elapsed() >= api.failover.timeout
        {
            // No more attempts: the gateway answers only when no backend
            // could have taken the request anyway.
            if self.any_available(pool, &ctx.routing.tried()) {
                return After::Deliver;
            }
            return self.when_exhausted(ctx, pool);
        }
        let next = match self.choose_at(ctx, pool, now) {
            next @ Choice::Backend { .. } => {
                ctx.routing.planned = Some((next, now));
                self.metrics
                    .failovers
                    .with_label_values(&[self.backend_name(backend), &failed.label()])
                    .inc();
                After::Retry
            }
            Choice::Exhausted { .. } => return self.when_exhausted(ctx, pool),
        };
        if let Some(a) = ctx.routing.attempts.last_mut() {
            a.failed_over = matches!(next, After::Retry);
            self.release(a);
        }
        next
    }

    /// After an attempt of a request seeking the owner of its object: when
    /// it was not there (`not_here`), the next backend of the API is asked,
    /// within the failover time; any other answer is the client's.
    fn seek_on(&self, ctx: &mut RequestContext, not_here: bool) -> After {
        let in_time = ctx.api.and_then(|a| self.apis.get(a)).is_some_and(|api| {
            ctx.routing.started.unwrap_or(ctx.started).elapsed() < api.failover.timeout
        });
        let next = (not_here && in_time)
            .then(|| self.next_to_seek(ctx))
            .flatten();
        let Some(backend) = next else {
            return After::Deliver;
        };
        self.plan(ctx, backend);
        if let Some(a) = ctx.routing.attempts.last_mut() {
            a.failed_over = true;
            self.release(a);
        }
        After::Retry
    }

    /// The backend that answered a request seeking the owner of its object
    /// with a success: the owner, to remember. Any other answer proves
    /// nothing about who holds the object.
    pub fn found_owner(&self, ctx: &RequestContext) -> Option<usize> {
        if ctx.routing.affinity != Some(Affinity::Seek) {
            return None;
        }
        let last = ctx.routing.attempts.last()?;
        match last.outcome {
            Some(Outcome::Status { status, .. }) if (200..300).contains(&status) => {
                Some(last.backend)
            }
            _ => None,
        }
    }

    /// Nothing is left to try after the last attempt failed. When backends
    /// of the pool are resting, the client gets a 429 (or 503) with the
    /// shortest rest among them: the last backend's own 429 when its rest is
    /// that shortest one (its body says more than the gateway's), else the
    /// gateway's answer. When none rests, the last answer passes through.
    fn when_exhausted(&self, ctx: &mut RequestContext, pool: usize) -> After {
        let Some(shortest) = self.shortest_rest(pool) else {
            return After::Deliver;
        };
        let now = self.now();
        let last_is_shortest_429 = ctx.routing.attempts.last().is_some_and(|a| {
            matches!(a.outcome, Some(Outcome::Status { status: 429, .. }))
                && self
                    .health
                    .get(a.backend)
                    .and_then(|h| h.breaker.open_until(now))
                    .is_some_and(|until| until.saturating_sub(now) <= shortest)
        });
        if last_is_shortest_429 {
            return After::Deliver;
        }
        let refusal = self.exhausted(ctx, pool);
        if let Some(a) = ctx.routing.attempts.last_mut() {
            self.release(a);
        }
        After::Refuse(refusal)
    }

    /// The attempt failed on a pooled connection the backend had closed
    /// (not the backend's fault): plan the same backend again, without
    /// counting a failure. At most [`MAX_STALE_RETRIES`] times per request
    /// (a backend that closed its idle connections closed every one the
    /// pool holds, and the retry may draw another of them), and only for
    /// calls that may be repeated after a lost connection (the request may
    /// have reached the backend before the connection broke). Returns
    /// whether it did.
    pub fn retry_same(&self, ctx: &mut RequestContext) -> bool {
        let kind = ctx.routing.kind.unwrap_or(CallKind::Generation);
        let stale = ctx
            .routing
            .attempts
            .iter()
            .filter(|a| a.stale_retry)
            .count();
        if !kind.may_fail_over(&Outcome::ConnectionLost) || stale >= MAX_STALE_RETRIES {
            return false;
        }
        let Some(a) = ctx.routing.attempts.last_mut() else {
            return false;
        };
        if a.outcome.is_some() {
            return false;
        }
        a.duration = a.started.elapsed();
        a.outcome = Some(Outcome::ConnectionLost);
        a.failed_over = true;
        let backend = a.backend;
        self.release(a);
        self.plan(ctx, backend);
        ctx.routing.repeat_planned = true;
        true
    }

    /// The next attempt goes to `backend`, whatever its breaker says.
    fn plan(&self, ctx: &mut RequestContext, backend: usize) {
        let choice = Choice::Backend {
            backend,
            probe: false,
            steered: false,
        };
        ctx.routing.planned = Some((choice, self.now()));
    }

    /// The attempt no longer counts as in flight.
    fn release(&self, attempt: &mut Attempt) {
        if std::mem::take(&mut attempt.in_flight)
            && let Some(h) = self.health.get(attempt.backend)
        {
            h.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The request is over: no attempt counts as in flight any more. An
    /// attempt with no outcome (the client left, a policy refused the body)
    /// is closed without touching the breaker.
    pub fn finish(&self, ctx: &mut RequestContext) {
        // The clock is read only for a probe left open (rarely).
        let mut now = None;
        for a in &mut ctx.routing.attempts {
            if a.outcome.is_none() {
                if a.in_flight {
                    a.duration = a.started.elapsed();
                }
                // A probe that never reported frees its slot at once.
                if let (Some(since), Some(h)) = (a.probe_admitted, self.health.get(a.backend)) {
                    let now = *now.get_or_insert_with(|| self.now());
                    h.breaker.abandon_probe(since, now);
                }
            }
            self.release(a);
        }
    }

    /// Each backend's state, for `GET /backends`.
    /// The name of pool `i`.
    pub fn pool_name(&self, i: usize) -> Option<&str> {
        self.pools.get(i).map(Pool::name)
    }

    pub fn statuses(&self) -> Vec<BackendStatus> {
        let now = self.now();
        self.names
            .iter()
            .zip(&self.health)
            .map(|((name, region), h)| {
                let (state, open_for, because, probing) = match h.breaker.view(now) {
                    BreakerView::Closed => ("closed", None, None, false),
                    BreakerView::Open { until, cause } => (
                        "open",
                        Some(until.saturating_sub(now).as_secs_f64()),
                        Some(serde_json::json!({
                            "rule": cause.rule,
                            "outcome": cause.outcome,
                            "retry_after_seconds": cause.retry_after.map(|d| d.as_secs_f64()),
                        })),
                        false,
                    ),
                    BreakerView::HalfOpen { probing } => ("half_open", None, None, probing),
                };
                let headroom = h.headroom.view(now);
                BackendStatus {
                    name: name.clone(),
                    region: region.clone(),
                    state,
                    open_for_seconds: open_for,
                    open_because: because,
                    probing,
                    remaining_tokens: headroom.and_then(|v| v.remaining_tokens),
                    remaining_requests: headroom.and_then(|v| v.remaining_requests),
                    headroom_expires_in_seconds: headroom
                        .map(|v| v.expires.saturating_sub(now).as_secs_f64()),
                    in_flight: h.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Bring the breaker-state and in-flight gauges up to date (before a
    /// scrape).
    pub fn sync_metrics(&self) {
        let now = self.now();
        for ((name, _), h) in self.names.iter().zip(&self.health) {
            let state = match h.breaker.view(now) {
                BreakerView::Closed => 0,
                BreakerView::Open { .. } => 1,
                BreakerView::HalfOpen { .. } => 2,
            };
            self.metrics
                .breaker_state
                .with_label_values(&[name])
                .set(state);
            self.metrics.in_flight.with_label_values(&[name]).set(
                i64::try_from(h.in_flight.load(std::sync::atomic::Ordering::Relaxed))
                    .unwrap_or(i64::MAX),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_limits::ManualClock;

    const BASE: &str = "
backends:
  - {name: a, url: 'http://127.0.0.1:1', region: Region A}
  - {name: b, url: 'http://127.0.0.1:2'}
  - {name: c, url: 'http://127.0.0.1:3'}
pools:
  - name: main
    backends:
      - {backend: a, priority: 1}
      - {backend: b, priority: 2}
  - name: other
    backends: [{backend: c}]
  - name: three
    backends: [{backend: a}, {backend: b}, {backend: c}]
";

    fn selector(api: &str) -> (BackendSelector, Arc<ManualClock>) {
        let yaml = format!("{BASE}apis:\n  - name: x\n    path: /openai\n{api}");
        let cfg = sluice_config::load_str(&yaml, "t.yaml", &std::env::temp_dir())
            .unwrap_or_else(|e| panic!("{e}"));
        let clock = Arc::new(ManualClock::from_millis(1_000_000));
        let s = BackendSelector::new(&cfg, clock.clone(), &Registry::new()).unwrap();
        (s, clock)
    }

    fn ctx(s: &BackendSelector, method: &str, rest: &str) -> RequestContext {
        let mut ctx = RequestContext {
            api: Some(0),
            ..RequestContext::default()
        };
        s.begin(&mut ctx, 0, method, rest, Some(10));
        ctx
    }

    const CHAT: &str = "/deployments/gpt-4o/chat/completions";

    fn headers<'a>(h: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + Copy {
        move |n| h.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
    }

    #[test]
    fn a_request_goes_to_its_deployments_pool() {
        let (s, _) = selector("    pool: main\n    deployment_pools: {emb: other}\n");
        let mut c = ctx(&s, "POST", "/deployments/emb/embeddings");
        assert_eq!(c.routing.pool, Some(1));
        assert_eq!(c.routing.need.tokens, Some(10));
        assert_eq!(s.next_backend(&mut c), Ok(2));
        let c = ctx(&s, "POST", CHAT);
        assert_eq!(c.routing.pool, Some(0));
        assert_eq!(c.routing.kind, Some(CallKind::Generation));
        let c = ctx(&s, "POST", "/files");
        assert_eq!(c.routing.kind, Some(CallKind::Stateful));
    }

    #[test]
    fn a_v1_call_goes_to_the_pool_of_its_body_model() {
        let (s, _) = selector("    pool: main\n    deployment_pools: {emb: other}\n");
        let mut c = RequestContext {
            api: Some(0),
            deployment: Some("emb".into()),
            ..RequestContext::default()
        };
        s.begin(&mut c, 0, "POST", "/v1/embeddings", None);
        assert_eq!(c.routing.pool, Some(1));
        // The path's deployment wins over anything else.
        let mut c = RequestContext {
            api: Some(0),
            deployment: Some("emb".into()),
            ..RequestContext::default()
        };
        s.begin(&mut c, 0, "POST", CHAT, None);
        assert_eq!(c.routing.pool, Some(0));
    }

    #[test]
    fn a_pinned_call_goes_to_its_owner_and_never_fails_over() {
        let (s, _) = selector("    pool: three\n");
        for status in [429, 500, 404, 200] {
            let mut c = ctx(&s, "POST", "/v1/responses");
            s.set_affinity(&mut c, Some(2));
            assert_eq!(c.routing.affinity, Some(Affinity::Pinned(2)));
            assert_eq!(s.next_backend(&mut c), Ok(2));
            assert_eq!(
                s.after_status(&mut c, status, headers(&[]), true),
                After::Deliver,
                "{status}"
            );
            assert_eq!(s.found_owner(&c), None, "a pinned call finds nothing new");
            s.finish(&mut c);
        }
        // Even when its breaker rests the owner (the 429 above tripped it).
        assert_eq!(s.statuses()[2].state, "open");
        let mut c = ctx(&s, "GET", "/v1/files/file-1");
        s.set_affinity(&mut c, Some(2));
        assert_eq!(s.next_backend(&mut c), Ok(2));
        // A connection failure is not moved either.
        assert_eq!(
            s.after_connect_error(&mut c, Outcome::ConnectFailed, true),
            After::Deliver
        );
        // A backend index out of range seeks instead.
        let mut c = ctx(&s, "GET", "/v1/files/file-1");
        s.set_affinity(&mut c, Some(9));
        assert_eq!(c.routing.affinity, Some(Affinity::Seek));
    }

    #[test]
    fn an_unknown_owner_is_sought_backend_by_backend() {
        let (s, _) = selector("    pool: main\n    deployment_pools: {emb: other}\n");
        // The API reaches a, b (main) and c (other): each is asked once.
        let mut c = ctx(&s, "GET", "/v1/responses/resp_1");
        s.set_affinity(&mut c, None);
        assert_eq!(s.next_backend(&mut c), Ok(0));
        assert_eq!(
            s.after_status(&mut c, 404, headers(&[]), true),
            After::Retry
        );
        assert_eq!(s.found_owner(&c), None);
        let second = s.next_backend(&mut c).unwrap();
        assert_ne!(second, 0);
        // The first attempt was the pool's choice; the next ones go where
        // the search says.
        assert!(!c.routing.attempts[0].bypassed);
        assert!(c.routing.attempts[1].bypassed);
        assert_eq!(
            s.after_status(&mut c, 404, headers(&[]), true),
            After::Retry
        );
        let third = s.next_backend(&mut c).unwrap();
        assert!(![0, second].contains(&third));
        // The last one says 404 too: that is the answer.
        assert_eq!(
            s.after_status(&mut c, 404, headers(&[]), true),
            After::Deliver
        );
        assert_eq!(s.found_owner(&c), None);
        assert!(c.routing.attempts.iter().take(2).all(|a| a.failed_over));
        s.finish(&mut c);
        assert!(s.statuses().iter().all(|b| b.in_flight == 0));

        // The second backend has it: it is the owner.
        let mut c = ctx(&s, "GET", "/v1/responses/resp_2");
        s.set_affinity(&mut c, None);
        s.next_backend(&mut c).unwrap();
        s.after_status(&mut c, 404, headers(&[]), true);
        let owner = s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_status(&mut c, 200, headers(&[]), true),
            After::Deliver
        );
        assert_eq!(s.found_owner(&c), Some(owner));
        // Other answers end the search where they are, without failover:
        // a 429, a 5xx, or a body that cannot be sent again.
        for (status, replayable) in [(429, true), (500, true), (408, true), (404, false)] {
            let mut c = ctx(&s, "GET", "/v1/responses/resp_3");
            s.set_affinity(&mut c, None);
            s.next_backend(&mut c).unwrap();
            assert_eq!(
                s.after_status(&mut c, status, headers(&[]), replayable),
                After::Deliver,
                "{status}"
            );
            assert_eq!(s.found_owner(&c), None, "{status}");
        }
        // A 400 (an unknown previous_response_id) moves on like a 404, and
        // so does a failure to connect; a 401 or 403 ends the search but
        // names no owner.
        let mut c = ctx(&s, "POST", "/v1/responses");
        s.set_affinity(&mut c, None);
        s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_status(&mut c, 400, headers(&[]), true),
            After::Retry
        );
        s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_connect_error(&mut c, Outcome::ConnectFailed, true),
            After::Retry
        );
        let last = s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_status(&mut c, 201, headers(&[]), true),
            After::Deliver
        );
        assert_eq!(s.found_owner(&c), Some(last));
        for status in [401, 403, 409] {
            let mut c = ctx(&s, "DELETE", "/v1/files/file-1");
            s.set_affinity(&mut c, None);
            s.next_backend(&mut c).unwrap();
            assert_eq!(
                s.after_status(&mut c, status, headers(&[]), true),
                After::Deliver
            );
            assert_eq!(s.found_owner(&c), None, "{status}");
        }
        // Not seeking: nothing found.
        let mut c = ctx(&s, "GET", "/v1/files/file-1");
        s.next_backend(&mut c).unwrap();
        s.after_status(&mut c, 200, headers(&[]), true);
        assert_eq!(s.found_owner(&c), None);
    }

    #[test]
    fn an_owner_outside_the_api_is_not_used() {
        // The API reaches a and b (pool main) only: an owner c seeks instead.
        let (s, _) = selector("    pool: main\n");
        let mut c = ctx(&s, "GET", "/v1/files/file-1");
        s.set_affinity(&mut c, Some(2));
        assert_eq!(c.routing.affinity, Some(Affinity::Seek));
        s.set_affinity(&mut c, Some(1));
        assert_eq!(c.routing.affinity, Some(Affinity::Pinned(1)));
        // Without an API nothing is reached.
        let mut c = RequestContext::default();
        s.set_affinity(&mut c, Some(0));
        assert_eq!(c.routing.affinity, Some(Affinity::Seek));
    }

    #[test]
    fn pinned_attempts_never_stand_in_for_a_breakers_probe() {
        let (s, clock) = selector("    pool: main\n");
        // a rests after a 429 with Retry-After: 5.
        let mut c = ctx(&s, "POST", CHAT);
        assert_eq!(s.next_backend(&mut c), Ok(0));
        let h = [("retry-after", "5")];
        s.after_status(&mut c, 429, headers(&h), true);
        s.finish(&mut c);
        assert_eq!(s.statuses()[0].state, "open");
        // A pinned failure while it rests does not extend or change the rest.
        let mut p = ctx(&s, "GET", "/v1/files/file-1");
        s.set_affinity(&mut p, Some(0));
        assert_eq!(s.next_backend(&mut p), Ok(0));
        assert!(p.routing.attempts[0].bypassed);
        let h = [("retry-after", "60")];
        s.after_status(&mut p, 429, headers(&h), true);
        s.finish(&mut p);
        assert_eq!(s.statuses()[0].open_for_seconds, Some(5.0));
        // Half-open: a pinned success does not close the breaker; only the
        // probe's outcome does.
        clock.advance(Duration::from_secs(5));
        let mut p = ctx(&s, "GET", "/v1/files/file-1");
        s.set_affinity(&mut p, Some(0));
        s.next_backend(&mut p).unwrap();
        s.after_status(&mut p, 200, headers(&[]), true);
        s.finish(&mut p);
        assert_eq!(s.statuses()[0].state, "half_open");
        // The probe (a comes first in its pool) closes it.
        let mut c = ctx(&s, "POST", CHAT);
        assert_eq!(s.next_backend(&mut c), Ok(0));
        assert!(c.routing.attempts[0].probe);
        s.after_status(&mut c, 200, headers(&[]), true);
        s.finish(&mut c);
        assert_eq!(s.statuses()[0].state, "closed");
        let mut p = ctx(&s, "GET", "/v1/files/file-1");
        s.set_affinity(&mut p, Some(0));
        s.next_backend(&mut p).unwrap();
        s.after_status(&mut p, 429, headers(&[("retry-after", "3")]), true);
        s.finish(&mut p);
        assert_eq!(s.statuses()[0].state, "open");
        assert_eq!(s.statuses()[0].open_for_seconds, Some(3.0));
    }

    #[test]
    fn a_seeking_call_asks_the_api_when_its_pool_is_resting() {
        // Pool main (a, b) rests; the API also reaches c through a
        // deployment pool: the seeking call asks c.
        let (s, _) = selector("    pool: main\n    deployment_pools: {emb: other}\n");
        for _ in 0..2 {
            let mut c = ctx(&s, "POST", CHAT);
            s.next_backend(&mut c).unwrap();
            s.after_status(&mut c, 429, headers(&[("retry-after", "30")]), false);
            s.finish(&mut c);
        }
        let mut c = ctx(&s, "GET", "/v1/files/file-1");
        assert!(s.next_backend(&mut c).is_err(), "nothing in the pool");
        let mut c = ctx(&s, "GET", "/v1/files/file-1");
        s.set_affinity(&mut c, None);
        assert_eq!(s.next_backend(&mut c), Ok(2));
        assert!(c.routing.attempts[0].bypassed);
    }

    #[test]
    fn seeking_stops_when_the_failover_time_is_spent() {
        let (s, _) = selector("    pool: three\n    failover: {timeout_ms: 1}\n");
        let mut c = ctx(&s, "GET", "/v1/responses/resp_1");
        s.set_affinity(&mut c, None);
        s.next_backend(&mut c).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            s.after_status(&mut c, 404, headers(&[]), true),
            After::Deliver
        );
    }

    #[test]
    fn a_429_fails_over_and_rests_the_backend_for_its_retry_after() {
        let (s, clock) = selector("    pool: main\n");
        let mut c = ctx(&s, "POST", CHAT);
        assert_eq!(s.next_backend(&mut c), Ok(0));
        assert_eq!(s.statuses()[0].in_flight, 1);
        let h = [("retry-after", "7")];
        assert_eq!(s.after_status(&mut c, 429, headers(&h), true), After::Retry);
        assert_eq!(s.statuses()[0].in_flight, 0);
        assert_eq!(s.next_backend(&mut c), Ok(1));
        assert_eq!(
            s.after_status(&mut c, 200, headers(&[]), true),
            After::Deliver
        );
        let a = &c.routing.attempts;
        assert_eq!(a.len(), 2);
        assert_eq!(
            a[0].outcome,
            Some(Outcome::Status {
                status: 429,
                retry_after: Some(Duration::from_secs(7))
            })
        );
        assert!(a[0].failed_over);
        assert_eq!(
            a[0].tripped.as_ref().map(|t| t.rule.as_str()),
            Some("throttled")
        );
        assert!(!a[1].failed_over);
        assert_eq!(c.backend, Some(1));
        // b stays in flight until the request ends.
        assert_eq!(s.statuses()[1].in_flight, 1);
        s.finish(&mut c);
        assert_eq!(s.statuses()[1].in_flight, 0);
        s.finish(&mut c);
        assert_eq!(s.statuses()[1].in_flight, 0, "released once");
        // a rests: the next request goes to b.
        let view = &s.statuses()[0];
        assert_eq!(view.state, "open");
        assert_eq!(view.region, "Region A");
        assert_eq!(view.open_for_seconds, Some(7.0));
        let mut c = ctx(&s, "POST", CHAT);
        assert_eq!(s.next_backend(&mut c), Ok(1));
        // After 7 s, a is probed again.
        clock.advance(Duration::from_secs(7));
        let mut c = ctx(&s, "POST", CHAT);
        assert_eq!(s.next_backend(&mut c), Ok(0));
        assert!(c.routing.attempts[0].probe);
    }

    #[test]
    fn every_backend_resting_gives_429_with_the_smallest_rest() {
        let (s, clock) = selector("    pool: main\n");
        let mut c = ctx(&s, "POST", CHAT);
        s.next_backend(&mut c).unwrap();
        let h = [("retry-after-ms", "4000")];
        assert_eq!(s.after_status(&mut c, 429, headers(&h), true), After::Retry);
        s.next_backend(&mut c).unwrap();
        let h = [("retry-after", "30")];
        let After::Refuse(e) = s.after_status(&mut c, 429, headers(&h), true) else {
            panic!("expected the gateway's answer")
        };
        assert_eq!(e.status, 429);
        assert!(e.message.contains("pool main"), "{}", e.message);
        let header = |n: &str| {
            e.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header("retry-after").as_deref(), Some("4"));
        assert_eq!(header("retry-after-ms").as_deref(), Some("4000"));
        // A new request is answered at once, with the rest left.
        clock.advance(Duration::from_millis(1500));
        let mut c = ctx(&s, "POST", CHAT);
        let e = s.next_backend(&mut c).unwrap_err();
        assert_eq!(e.status, 429);
        assert_eq!(e.headers[0].1, "3");
        assert!(c.routing.attempts.is_empty());
    }

    #[test]
    fn the_last_backends_own_429_passes_when_its_rest_is_the_shortest() {
        let (s, _) = selector("    pool: main\n");
        let mut c = ctx(&s, "POST", CHAT);
        s.next_backend(&mut c).unwrap();
        let h = [("retry-after", "30")];
        assert_eq!(s.after_status(&mut c, 429, headers(&h), true), After::Retry);
        s.next_backend(&mut c).unwrap();
        let h = [("retry-after", "3")];
        assert_eq!(
            s.after_status(&mut c, 429, headers(&h), true),
            After::Deliver
        );
        assert_eq!(s.statuses()[1].in_flight, 1);
        s.finish(&mut c);
        // A 5xx that tripped is not passed on as the pool's answer.
        let (s, _) = selector("    backends: [c]\n");
        let rules_failures = 3;
        let mut last = After::Deliver;
        for _ in 0..rules_failures {
            let mut c = ctx(&s, "POST", CHAT);
            s.next_backend(&mut c).unwrap();
            last = s.after_status(&mut c, 503, headers(&[]), true);
        }
        assert!(
            matches!(last, After::Refuse(ref e) if e.status == 429),
            "{last:?}"
        );
    }

    #[test]
    fn exhausted_can_answer_503() {
        let (s, _) = selector("    backends: [c]\n    failover: {when_exhausted: 503}\n");
        let mut c = ctx(&s, "POST", CHAT);
        s.next_backend(&mut c).unwrap();
        // The only backend's own 429 passes through ...
        let h = [("retry-after", "2")];
        assert_eq!(
            s.after_status(&mut c, 429, headers(&h), true),
            After::Deliver
        );
        // ... and while it rests, the gateway answers in APIM's shape.
        let mut c = ctx(&s, "POST", CHAT);
        let e = s.next_backend(&mut c).unwrap_err();
        assert_eq!(e.status, 503);
        assert!(e.message.contains("temporarily unavailable"));
        assert_eq!(e.headers[0].1, "2");
    }

    #[test]
    fn failures_that_trip_nothing_deliver_the_last_answer() {
        let (s, _) = selector("    pool: main\n");
        let mut c = ctx(&s, "POST", CHAT);
        s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_status(&mut c, 500, headers(&[]), true),
            After::Retry
        );
        s.next_backend(&mut c).unwrap();
        // b answers 500 too: nobody rests (three are needed), nothing is left.
        assert_eq!(
            s.after_status(&mut c, 500, headers(&[]), true),
            After::Deliver
        );
        assert_eq!(
            s.statuses()[1].in_flight,
            1,
            "the delivered attempt is kept"
        );
        s.finish(&mut c);
        assert_eq!(s.statuses()[1].in_flight, 0);
    }

    #[test]
    fn no_failover_when_the_body_cannot_be_replayed_or_the_call_may_not() {
        let (s, _) = selector("    pool: main\n");
        let mut c = ctx(&s, "POST", CHAT);
        s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_status(&mut c, 503, headers(&[]), false),
            After::Deliver
        );
        // A state-creating call: a 500 may have acted; a 429 and a refused
        // connection did not.
        let mut c = ctx(&s, "POST", "/files");
        s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_status(&mut c, 500, headers(&[]), true),
            After::Deliver
        );
        let mut c = ctx(&s, "POST", "/batches");
        s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_error(&mut c, Outcome::ConnectionLost, true),
            After::Deliver
        );
        // (a fresh gateway: the three failures above rested backend a)
        let (s, _) = selector("    pool: main\n");
        let mut c = ctx(&s, "POST", "/batches");
        assert_eq!(s.next_backend(&mut c), Ok(0));
        assert_eq!(
            s.after_error(&mut c, Outcome::ConnectFailed, true),
            After::Retry
        );
        assert_eq!(s.next_backend(&mut c), Ok(1));
    }

    #[test]
    fn attempts_and_time_are_bounded() {
        let (s, _) = selector("    pool: main\n    failover: {max_attempts: 1}\n");
        // A call seeking the owner of its object may still ask both
        // backends of the API: pingora's retry limit allows for it.
        assert_eq!(s.max_attempts(), 2);
        let mut c = ctx(&s, "POST", CHAT);
        s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_error(&mut c, Outcome::Timeout, true),
            After::Deliver
        );

        let (s, _) = selector("    pool: main\n    failover: {timeout_ms: 1}\n");
        assert_eq!(s.max_attempts(), 2, "default: every member once");
        let mut c = ctx(&s, "POST", CHAT);
        c.routing.started = Some(Instant::now() - Duration::from_millis(5));
        s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_error(&mut c, Outcome::ConnectFailed, true),
            After::Deliver
        );
    }

    #[test]
    fn a_stale_pooled_connection_retries_the_same_backend() {
        let (s, _) = selector("    pool: main\n    failover: {max_attempts: 1}\n");
        let mut c = ctx(&s, "POST", CHAT);
        assert_eq!(s.next_backend(&mut c), Ok(0));
        assert!(s.retry_same(&mut c));
        assert_eq!(s.statuses()[0].in_flight, 0);
        assert_eq!(s.next_backend(&mut c), Ok(0));
        assert!(c.routing.attempts[1].stale_retry);
        assert!(!c.routing.attempts[0].stale_retry);
        assert_eq!(s.statuses()[0].state, "closed", "not the backend's fault");
        // Twice per request at most.
        assert!(s.retry_same(&mut c));
        assert_eq!(s.next_backend(&mut c), Ok(0));
        assert!(c.routing.attempts[2].stale_retry);
        assert!(!s.retry_same(&mut c));
        // The repeats do not use up the attempts: with max_attempts 1 the
        // request still gets its one real attempt.
        assert_eq!(c.routing.counted_attempts(), 1);
        // Only an open attempt can be retried so.
        s.after_status(&mut c, 200, headers(&[]), true);
        let mut c2 = ctx(&s, "POST", CHAT);
        s.next_backend(&mut c2).unwrap();
        s.after_status(&mut c2, 200, headers(&[]), true);
        assert!(!s.retry_same(&mut c2));
        assert!(c2.routing.planned.is_none());
        // Never for a call that creates state: it may have reached the backend.
        let mut c3 = ctx(&s, "POST", "/files");
        s.next_backend(&mut c3).unwrap();
        assert!(!s.retry_same(&mut c3));
        let mut c4 = RequestContext::default();
        assert!(!s.retry_same(&mut c4), "no attempt yet");
    }

    #[test]
    fn a_connect_failure_of_any_kind_fails_over_a_state_creating_call() {
        let (s, _) = selector("    pool: main\n");
        let mut c = ctx(&s, "POST", "/files");
        s.next_backend(&mut c).unwrap();
        // A connect timeout: nothing was sent.
        assert_eq!(
            s.after_connect_error(&mut c, Outcome::Timeout, true),
            After::Retry
        );
        assert_eq!(
            c.routing.attempts[0].outcome,
            Some(Outcome::Timeout),
            "the breaker sees the timeout"
        );
        // The same outcome after sending is not retried for such a call.
        let mut c = ctx(&s, "POST", "/files");
        s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_error(&mut c, Outcome::Timeout, true),
            After::Deliver
        );
    }

    #[test]
    fn the_failover_clock_starts_when_routing_begins() {
        let (s, _) = selector("    pool: main\n    failover: {timeout_ms: 60000}\n");
        let mut c = ctx(&s, "POST", CHAT);
        // A slow upload before routing does not count.
        c.started = Instant::now() - Duration::from_secs(600);
        s.next_backend(&mut c).unwrap();
        assert_eq!(s.failover_left(&c), None, "the first attempt is never cut");
        assert_eq!(s.after_error(&mut c, Outcome::Timeout, true), After::Retry);
        s.next_backend(&mut c).unwrap();
        let left = s.failover_left(&c).unwrap();
        assert!(
            left > Duration::from_secs(59) && left <= Duration::from_secs(60),
            "{left:?}"
        );
        assert_eq!(s.failover_left(&RequestContext::default()), None);
    }

    /// Backend `c` answers 429 with a rest of a second; once it is over
    /// (`advance`), a request takes the probe: its context.
    fn rest_then_probe(s: &BackendSelector, advance: impl Fn(Duration)) -> RequestContext {
        let mut c = ctx(s, "POST", CHAT);
        s.next_backend(&mut c).unwrap();
        s.after_status(&mut c, 429, headers(&[("retry-after", "1")]), true);
        s.finish(&mut c);
        advance(Duration::from_secs(1));
        let mut probe = ctx(s, "POST", CHAT);
        assert_eq!(s.next_backend(&mut probe), Ok(2));
        assert!(probe.routing.attempts[0].probe);
        probe
    }

    #[test]
    fn an_abandoned_probe_frees_the_backend_at_once() {
        let (s, clock) = selector("    backends: [c]\n");
        let mut probe = rest_then_probe(&s, |d| clock.advance(d));
        // While the probe is out nobody else goes.
        let mut other = ctx(&s, "POST", CHAT);
        assert!(s.next_backend(&mut other).is_err());
        // The client left: no outcome. The slot is free again at once.
        s.finish(&mut probe);
        let mut next = ctx(&s, "POST", CHAT);
        assert_eq!(s.next_backend(&mut next), Ok(2));
        assert!(next.routing.attempts[0].probe);
    }

    /// A clock that moves on every monotonic reading, as the real one does
    /// between any two readings.
    #[derive(Debug)]
    struct Ticking(Arc<ManualClock>);

    impl sluice_base::Clock for Ticking {
        fn unix_now(&self) -> Duration {
            self.0.unix_now()
        }

        fn monotonic(&self) -> Duration {
            let now = self.0.monotonic();
            self.0.advance(Duration::from_micros(1));
            now
        }
    }

    #[test]
    fn an_abandoned_probe_is_freed_with_a_clock_that_never_stands_still() {
        // The probe's slot is freed only for the probe it was lent to, known
        // by the time it was admitted: the time recorded on the attempt must
        // be the breaker's own reading, not a later one.
        let yaml = format!("{BASE}apis:\n  - name: x\n    path: /openai\n    backends: [c]\n");
        let cfg = sluice_config::load_str(&yaml, "t.yaml", &std::env::temp_dir())
            .unwrap_or_else(|e| panic!("{e}"));
        let manual = Arc::new(ManualClock::from_millis(1_000_000));
        let s = BackendSelector::new(&cfg, Arc::new(Ticking(manual.clone())), &Registry::new())
            .unwrap();
        let mut probe = rest_then_probe(&s, |d| manual.advance(d));
        s.finish(&mut probe);
        let mut next = ctx(&s, "POST", CHAT);
        assert_eq!(s.next_backend(&mut next), Ok(2), "the slot was freed");
        assert!(next.routing.attempts[0].probe);
    }

    #[test]
    fn headroom_from_answers_is_shown_and_metrics_follow() {
        let (s, _) = selector("    pool: main\n");
        let mut c = ctx(&s, "POST", CHAT);
        s.next_backend(&mut c).unwrap();
        let h = [
            ("x-ratelimit-remaining-tokens", "900"),
            ("x-ratelimit-remaining-requests", "9"),
        ];
        s.after_status(&mut c, 200, headers(&h), true);
        let v = &s.statuses()[0];
        assert_eq!(
            (v.remaining_tokens, v.remaining_requests),
            (Some(900), Some(9))
        );
        assert_eq!(v.headroom_expires_in_seconds, Some(60.0));
        s.sync_metrics();
        assert_eq!(s.metrics.attempts.with_label_values(&["a", "200"]).get(), 1);
        assert_eq!(s.metrics.breaker_state.with_label_values(&["a"]).get(), 0);
        assert_eq!(s.metrics.in_flight.with_label_values(&["a"]).get(), 1);
        assert_eq!(s.backend_name(0), "a");
        assert_eq!(s.backend_name(9), "backend");
    }

    #[test]
    fn max_attempts_counts_real_attempts_and_leaves_the_rest_to_the_backends_answer() {
        let (s, _) = selector("    pool: three\n    failover: {max_attempts: 2}\n");
        let mut c = ctx(&s, "POST", CHAT);
        s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_status(&mut c, 500, headers(&[]), true),
            After::Retry
        );
        s.next_backend(&mut c).unwrap();
        // Two attempts made; a third backend is free: its answer is not
        // awaited, the second backend's 500 is delivered.
        assert_eq!(
            s.after_status(&mut c, 500, headers(&[]), true),
            After::Deliver
        );
        assert_eq!(c.routing.attempts.len(), 2);
    }

    /// Send one request straight to backend b (index 1), which answers 429
    /// with Retry-After 9: b rests for 9 s.
    fn throttle_backend_b(s: &BackendSelector) {
        let mut c = ctx(s, "POST", CHAT);
        c.routing.planned = Some((
            Choice::Backend {
                backend: 1,
                probe: false,
                steered: false,
            },
            Duration::ZERO,
        ));
        assert_eq!(s.next_backend(&mut c), Ok(1));
        s.after_status(&mut c, 429, headers(&[("retry-after", "9")]), true);
        s.finish(&mut c);
    }

    #[test]
    fn with_attempts_used_up_the_gateway_answers_only_when_nothing_else_could() {
        // Backend b rests (its own 429 earlier); a answers 500 on the one
        // attempt allowed: a failed, b rests -> the gateway's 429.
        let (s, _) = selector("    pool: main\n    failover: {max_attempts: 1}\n");
        let mut warm = ctx(&s, "POST", CHAT);
        s.next_backend(&mut warm).unwrap();
        s.after_status(&mut warm, 200, headers(&[]), true);
        s.finish(&mut warm);
        throttle_backend_b(&s);
        assert_eq!(s.statuses()[1].state, "open");
        let mut c = ctx(&s, "POST", CHAT);
        assert_eq!(s.next_backend(&mut c), Ok(0));
        match s.after_status(&mut c, 500, headers(&[]), true) {
            After::Refuse(e) => assert_eq!(e.headers[0].1, "9"),
            other => panic!("{other:?}"),
        }
        // Nothing rests: a's own answer passes even with attempts used up.
        let (s, _) = selector("    pool: main\n    failover: {max_attempts: 1}\n");
        let mut c = ctx(&s, "POST", CHAT);
        s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_status(&mut c, 500, headers(&[]), true),
            After::Deliver
        );
        // A backend rests but another is free: the answer passes.
        let (s, _) = selector("    pool: three\n    failover: {max_attempts: 1}\n");
        throttle_backend_b(&s);
        let mut c = ctx(&s, "POST", CHAT);
        assert_eq!(s.next_backend(&mut c), Ok(0));
        assert_eq!(
            s.after_status(&mut c, 500, headers(&[]), true),
            After::Deliver
        );
        // Another backend free: the answer passes too.
        let (s, _) = selector("    pool: main\n    failover: {max_attempts: 1}\n");
        let mut c = ctx(&s, "POST", CHAT);
        s.next_backend(&mut c).unwrap();
        assert_eq!(
            s.after_status(&mut c, 429, headers(&[("retry-after", "30")]), true),
            After::Deliver
        );
    }

    #[test]
    fn a_5xx_retry_after_sets_the_rest_and_a_429_empties_the_headroom() {
        let (s, _) = selector("    backends: [c]\n");
        for _ in 0..3 {
            let mut c = ctx(&s, "POST", CHAT);
            s.next_backend(&mut c).unwrap();
            s.after_status(&mut c, 503, headers(&[("retry-after", "20")]), true);
            s.finish(&mut c);
        }
        let v = &s.statuses()[2];
        assert_eq!(v.state, "open");
        assert_eq!(
            v.open_for_seconds,
            Some(20.0),
            "the 503's Retry-After, not 10 s"
        );
        // A 200 that says Retry-After is not a rest.
        let (s, _) = selector("    backends: [c]\n");
        let mut c = ctx(&s, "POST", CHAT);
        s.next_backend(&mut c).unwrap();
        s.after_status(&mut c, 200, headers(&[("retry-after", "20")]), true);
        assert_eq!(s.statuses()[2].state, "closed");
        assert_eq!(s.statuses()[2].remaining_tokens, None);
        // A 429 with a wait: no room until then, whatever its headers said.
        let (s, _) = selector("    pool: three\n");
        let mut c = ctx(&s, "POST", CHAT);
        s.next_backend(&mut c).unwrap();
        s.after_status(&mut c, 429, headers(&[("retry-after", "5")]), true);
        let v = &s.statuses()[c.routing.attempts[0].backend];
        assert_eq!(
            (v.remaining_tokens, v.remaining_requests),
            (Some(0), Some(0))
        );
        assert_eq!(v.headroom_expires_in_seconds, Some(5.0));
    }

    #[test]
    fn retry_after_header_seconds_round_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_seconds(Duration::from_secs(3)), 3);
    }
}
