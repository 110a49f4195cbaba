//! An API's inbound steps, in the order `gateway.yaml` lists them, and what
//! happens to their state once the response is known.
//!
//! Order of a request:
//! 1. authentication by the API's `auth` mode (subscription key, JWT, or either);
//! 2. each policy in list order (`validate_jwt`, `rate_limit`, `quota`,
//!    `token_limit`, `emit_token_metric`); any may refuse the request;
//! 3. (the core forwards it)
//! 4. [`ApiPipeline::start_response`] / [`ApiPipeline::response_chunk`] read the
//!    response's usage as it streams past;
//! 5. [`ApiPipeline::finish`] reconciles token reservations with the actual
//!    usage and records token metrics.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use sluice_auth::{Fetch, JwtError, JwtSettings, JwtValidator, KeysSource};
use sluice_config::{
    Api, ApiAuth, CallLimit, CounterKey, Dimension, JwtKeys, Policy, QuotaPeriod, TokenLimit,
};
use sluice_limits::{
    CounterStore, Limit, Period, Window, call_quota_message, client_key, rate_limit_message,
    retry_after_secs, token_limit_message, token_quota_message,
};
use sluice_tokens::{Operation, UsageScanner, encoding_for_model, estimate_request};

use sluice_trace::Section;
use sluice_trace::record::Val;

use crate::context::{RequestContext, TokenCharge};
use crate::error::GatewayError;
use crate::metrics::TokenMetrics;
use crate::subscription::{SubscriptionIndex, presented_key};

/// What every API's pipeline shares.
#[derive(Debug, Clone)]
pub struct Shared {
    pub subscriptions: Arc<SubscriptionIndex>,
    pub store: Arc<dyn CounterStore>,
    pub metrics: Option<Arc<TokenMetrics>>,
}

/// The parts of a request the inbound steps look at. Its `Debug` leaves out
/// the headers, the query and the body: they carry the caller's credentials.
#[derive(Clone, Copy)]
pub struct InboundRequest<'a> {
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    pub client_ip: Option<IpAddr>,
    /// Path after the API prefix (`/deployments/{d}/chat/completions`).
    pub rest_path: &'a str,
    /// The whole body when it was read before routing (≤ 64 KiB).
    pub body: Option<&'a [u8]>,
}

impl<'a> InboundRequest<'a> {
    /// The request's `Host`, for the API URL APIM echoes in
    /// `WWW-Authenticate` (looked up only for that refusal).
    pub fn host(&self) -> &'a str {
        self.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost")
    }
}

impl std::fmt::Debug for InboundRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundRequest")
            .field("rest_path", &self.rest_path)
            .field("client_ip", &self.client_ip)
            .field("host", &self.host())
            .field("headers", &self.headers.len())
            .field("body_len", &self.body.map(<[u8]>::len))
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum Step {
    Jwt(Arc<JwtValidator>),
    Calls {
        limit: Limit,
        key: CounterKey,
        quota: bool,
    },
    Tokens(Box<TokenStep>),
    Metric(Vec<Dimension>),
}

/// A `token_limit` step: its settings and the two limits it derives.
#[derive(Debug)]
struct TokenStep {
    cfg: TokenLimit,
    tpm: Option<Limit>,
    quota: Option<Limit>,
}

/// One API's compiled pipeline.
#[derive(Debug)]
pub struct ApiPipeline {
    api_name: Arc<str>,
    api: Api,
    steps: Vec<Step>,
    /// The JWT validator, when the API has a `validate_jwt` step.
    jwt: Option<Arc<JwtValidator>>,
    /// Some step needs the response's usage (token_limit, emit_token_metric).
    needs_usage: bool,
    /// A metric has the `backend_region` dimension (see [`Self::reads_region`]).
    reads_region: bool,
    /// Index of the first step that needs the request body (`token_limit`);
    /// the steps before it run before the body is read.
    body_from: usize,
}

fn period(p: QuotaPeriod) -> Period {
    match p {
        QuotaPeriod::Hourly => Period::Hourly,
        QuotaPeriod::Daily => Period::Daily,
        QuotaPeriod::Weekly => Period::Weekly,
        QuotaPeriod::Monthly => Period::Monthly,
        QuotaPeriod::Yearly => Period::Yearly,
    }
}

impl ApiPipeline {
    /// Compile an API's policies. `fetch` is how `validate_jwt` gets keys.
    pub fn new(api: &Api, fetch: Arc<dyn Fetch>) -> Self {
        let mut steps = Vec::with_capacity(api.policies.len());
        let mut jwt = None;
        let mut needs_usage = false;
        for p in &api.policies {
            match p {
                Policy::ValidateJwt(v) => {
                    let validator = Arc::new(jwt_validator(v, fetch.clone()));
                    jwt = Some(validator.clone());
                    steps.push(Step::Jwt(validator));
                }
                Policy::RateLimit(c) => steps.push(calls(c, false)),
                Policy::Quota(c) => steps.push(calls(c, true)),
                Policy::TokenLimit(t) => {
                    needs_usage = true;
                    steps.push(Step::Tokens(Box::new(TokenStep {
                        tpm: t.tokens_per_minute.map(|n| Limit {
                            limit: n,
                            window: Window::Sliding(Duration::from_secs(60)),
                        }),
                        quota: t.token_quota.map(|(n, p)| Limit {
                            limit: n,
                            window: Window::Calendar(period(p)),
                        }),
                        cfg: t.clone(),
                    })));
                }
                Policy::EmitTokenMetric(m) => {
                    needs_usage = true;
                    steps.push(Step::Metric(m.dimensions.clone()));
                }
            }
        }
        let body_from = steps
            .iter()
            .position(|s| matches!(s, Step::Tokens(_)))
            .unwrap_or(steps.len());
        let reads_region = steps
            .iter()
            .any(|s| matches!(s, Step::Metric(dims) if dims.contains(&Dimension::BackendRegion)));
        ApiPipeline {
            api_name: Arc::from(api.name.as_str()),
            api: api.clone(),
            body_from,
            steps,
            jwt,
            needs_usage,
            reads_region,
        }
    }

    /// A body streamed to the backend has ended: estimate its prompt from the
    /// copy kept meanwhile, for charging a stream that reports no usage.
    pub async fn streamed_body_done(&self, ctx: &mut RequestContext, body: Vec<u8>) {
        if self.needs_usage && ctx.estimate.is_none() {
            estimate_owned(ctx, body).await;
        }
    }

    /// The API this pipeline serves, as configured.
    pub fn api(&self) -> &Api {
        &self.api
    }

    /// Whether the response's usage is read (token_limit, emit_token_metric).
    pub fn needs_usage(&self) -> bool {
        self.needs_usage
    }

    /// Whether a step reads the region the backend answered from (a metric
    /// with the `backend_region` dimension): only then is it kept per
    /// request.
    pub fn reads_region(&self) -> bool {
        self.reads_region
    }

    /// The JWT validator, if any (the proxy warms its key cache at start).
    pub fn jwt_validator(&self) -> Option<&Arc<JwtValidator>> {
        self.jwt.as_ref()
    }

    /// Authentication, then every policy in order, as one call (for callers
    /// that have the whole request at once). The proxy calls
    /// [`ApiPipeline::inbound_head`] and [`ApiPipeline::inbound_body`] instead,
    /// reading the body in between.
    pub async fn inbound(
        &self,
        req: &InboundRequest<'_>,
        ctx: &mut RequestContext,
        shared: &Shared,
    ) -> Result<(), GatewayError> {
        self.inbound_head(req, ctx, shared).await?;
        self.inbound_body(req, ctx, shared).await
    }

    /// The steps that need only the request head, run before any body is
    /// read: authentication (subscription key), then, in list order, the
    /// steps listed before the first step that needs the body
    /// (`token_limit`): `validate_jwt`, `rate_limit` and `quota`. A
    /// `validate_jwt` listed after a `token_limit` runs here too, after them:
    /// the caller is always known before the body is read. A request refused
    /// here is answered without reading its body. `Err` is the answer to send
    /// instead of forwarding.
    pub async fn inbound_head(
        &self,
        req: &InboundRequest<'_>,
        ctx: &mut RequestContext,
        shared: &Shared,
    ) -> Result<(), GatewayError> {
        ctx.client_ip = req.client_ip;
        self.authenticate(req, ctx, shared)?;
        for step in &self.steps[..self.body_from] {
            self.run_step(step, req, ctx, shared).await?;
        }
        for step in &self.steps[self.body_from..] {
            if matches!(step, Step::Jwt(_)) {
                self.run_step(step, req, ctx, shared).await?;
            }
        }
        Ok(())
    }

    /// Whether some step waits for the body (`token_limit`, or a step listed
    /// after one). When the body streams to the backend instead of being read
    /// first, the proxy runs [`ApiPipeline::inbound_body`] at its end, before
    /// its last bytes are released.
    pub fn has_body_steps(&self) -> bool {
        self.body_from < self.steps.len()
    }

    /// The remaining steps, once the body is in `req.body` (read before
    /// forwarding, or a copy of a body that streamed).
    pub async fn inbound_body(
        &self,
        req: &InboundRequest<'_>,
        ctx: &mut RequestContext,
        shared: &Shared,
    ) -> Result<(), GatewayError> {
        if self.needs_usage {
            let op = Operation::from_path(req.rest_path);
            ctx.operation = Some(op);
            // The path's deployment; on v1 paths the body's `model`, read
            // before routing, stays.
            if let Some(d) = crate::route::deployment_of(req.rest_path) {
                ctx.deployment = Some(d.to_string());
            }
        }
        for step in &self.steps[self.body_from..] {
            if !matches!(step, Step::Jwt(_)) {
                self.run_step(step, req, ctx, shared).await?;
            }
        }
        // A stream without a usage chunk is charged and measured as the prompt
        // estimate plus the streamed tokens: estimate it if no step did.
        if self.needs_usage && ctx.estimate.is_none() && ctx.stream {
            estimate(req, ctx).await;
        }
        Ok(())
    }

    async fn run_step(
        &self,
        step: &Step,
        req: &InboundRequest<'_>,
        ctx: &mut RequestContext,
        shared: &Shared,
    ) -> Result<(), GatewayError> {
        match step {
            Step::Jwt(v) => {
                if self.api.auth == ApiAuth::KeyOrJwt && ctx.subscription.is_some() {
                    // Either credential will do, and a key was given.
                    return Ok(());
                }
                let auth = req
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok());
                match v.validate(auth).await {
                    Ok(caller) => {
                        ctx.trace(Section::Inbound, "validate-jwt", || {
                            jwt_accepted(v.settings(), &caller)
                        });
                        ctx.caller = Some(Box::new(caller));
                        Ok(())
                    }
                    Err(e) => {
                        ctx.trace(Section::Inbound, "validate-jwt", || {
                            Val::obj([
                                ("message", Val::from(e.message())),
                                ("result", "refused".into()),
                            ])
                        });
                        Err(jwt_error(&e))
                    }
                }
            }
            Step::Metric(_) => Ok(()),
            Step::Calls { limit, key, quota } => {
                let k = counter_key(key, req, ctx, if *quota { "quota" } else { "calls" });
                let source = if *quota { "quota" } else { "rate-limit" };
                match shared.store.reserve(&k, limit, 1).await {
                    Ok(r) => {
                        ctx.trace(Section::Inbound, source, || {
                            limit_trace(&k, limit, "accepted", Some(r.remaining()), None)
                        });
                        Ok(())
                    }
                    Err(ex) => {
                        ctx.trace(Section::Inbound, source, || {
                            limit_trace(&k, limit, "refused", None, Some(ex.retry_after))
                        });
                        let secs = retry_after_secs(ex.retry_after).to_string();
                        Err(if *quota {
                            GatewayError::new(403, call_quota_message(ex.retry_after))
                                .with_header("retry-after", secs)
                        } else {
                            GatewayError::new(429, rate_limit_message(ex.retry_after))
                                .with_header("retry-after", secs)
                        })
                    }
                }
            }
            Step::Tokens(t) => self.token_step(t, req, ctx, shared).await,
        }
    }

    fn authenticate(
        &self,
        req: &InboundRequest<'_>,
        ctx: &mut RequestContext,
        shared: &Shared,
    ) -> Result<(), GatewayError> {
        let realm = || format!("http://{}{}", req.host(), self.api.path);
        let settings = &self.api.subscription;
        // On v1 paths the plain `OpenAI` client sends the key as a bearer.
        let v1 = req.rest_path == "/v1" || req.rest_path.starts_with("/v1/");
        // A Realtime handshake from a browser carries it in `api-key=`.
        let realtime = crate::realtime::is_realtime_path(req.rest_path).is_some();
        let key = presented_key(settings, req.headers, req.query, v1, realtime);
        let presented = key.is_some();
        let check = |ctx: &mut RequestContext| -> Result<(), GatewayError> {
            match shared
                .subscriptions
                .check_presented(&self.api.name, settings, key.as_deref())
            {
                Ok(sub) => {
                    ctx.trace(Section::Inbound, "subscription-key", || match &sub {
                        Some(m) => Val::obj([
                            ("message", "The subscription key was accepted.".into()),
                            ("subscription", Val::from(m.name.to_string())),
                            ("key", Val::from(m.slot.label())),
                        ]),
                        None => "No subscription key is required for this API.".into(),
                    });
                    ctx.subscription = sub;
                    Ok(())
                }
                Err(e) => {
                    let answer = e.response(&realm(), settings);
                    ctx.trace(Section::Inbound, "subscription-key", || {
                        Val::obj([
                            ("message", Val::from(answer.message.to_string())),
                            ("result", "refused".into()),
                        ])
                    });
                    Err(answer)
                }
            }
        };
        match self.api.auth {
            ApiAuth::Key => check(ctx),
            ApiAuth::Jwt => Ok(()),
            ApiAuth::KeyOrJwt => {
                if presented {
                    check(ctx)
                } else {
                    ctx.trace(Section::Inbound, "subscription-key", || {
                        "No subscription key: the caller must present a JWT.".into()
                    });
                    Ok(())
                }
            }
        }
    }

    async fn token_step(
        &self,
        t: &TokenStep,
        req: &InboundRequest<'_>,
        ctx: &mut RequestContext,
        shared: &Shared,
    ) -> Result<(), GatewayError> {
        let (cfg, tpm, quota) = (&t.cfg, t.tpm.as_ref(), t.quota.as_ref());
        let key = counter_key(&cfg.counter_key, req, ctx, "tokens");
        if ctx.estimate.is_none() {
            estimate(req, ctx).await;
        }
        // Streams always have their prompt estimated, as APIM does; other
        // requests only when asked.
        let prompt = match &ctx.estimate {
            Some(e) if cfg.estimate_prompt_tokens || ctx.stream => u64::from(e.prompt_tokens),
            _ => 0,
        };
        let smallest = [tpm, quota]
            .into_iter()
            .flatten()
            .map(|l| l.limit)
            .min()
            .unwrap_or(u64::MAX);
        let plan = reservation(
            prompt,
            ctx.operation.unwrap_or(Operation::Other),
            ctx.estimate.as_ref(),
            cfg.default_completion_tokens,
            smallest,
        )?;
        let amount = plan.total();
        let mut charge = TokenCharge {
            estimated: prompt,
            reserved: amount,
            tpm: None,
            quota: None,
        };
        let estimated = ctx.estimate.as_ref().map(|e| e.prompt_tokens);
        ctx.trace(Section::Inbound, "llm-token-limit", || {
            Val::obj([
                ("message", "Tokens were estimated for the request.".into()),
                ("counterKey", Val::from(key.clone())),
                ("estimatedPromptTokens", Val::from(estimated)),
                ("promptTokensCharged", prompt.into()),
                ("tokensReserved", amount.into()),
            ])
        });
        if let Some(limit) = tpm {
            match shared.store.reserve(&key, limit, amount).await {
                Ok(r) => {
                    ctx.trace(Section::Inbound, "llm-token-limit", || {
                        limit_trace(&key, limit, "accepted", Some(r.remaining()), None)
                    });
                    charge.tpm = Some(r);
                }
                Err(ex) => {
                    ctx.trace(Section::Inbound, "llm-token-limit", || {
                        limit_trace(&key, limit, "refused", None, Some(ex.retry_after))
                    });
                    return Err(GatewayError::new(429, token_limit_message(ex.retry_after))
                        .with_header_name(
                            cfg.retry_after_header_name.clone(),
                            retry_after_secs(ex.retry_after).to_string(),
                        ));
                }
            }
        }
        if let Some(limit) = quota {
            match shared.store.reserve(&key, limit, amount).await {
                Ok(r) => {
                    ctx.trace(Section::Inbound, "llm-token-limit", || {
                        limit_trace(&key, limit, "accepted", Some(r.remaining()), None)
                    });
                    charge.quota = Some(r);
                }
                Err(ex) => {
                    ctx.trace(Section::Inbound, "llm-token-limit", || {
                        limit_trace(&key, limit, "refused", None, Some(ex.retry_after))
                    });
                    if let Some(r) = &charge.tpm {
                        shared.store.reconcile(r, 0).await;
                    }
                    return Err(GatewayError::new(403, token_quota_message(ex.retry_after))
                        .with_header_name(
                            cfg.retry_after_header_name.clone(),
                            retry_after_secs(ex.retry_after).to_string(),
                        ));
                }
            }
        }
        if let (Some(h), Some(r)) = (&cfg.remaining_tokens_header_name, &charge.tpm) {
            ctx.response_headers
                .push((h.clone(), r.remaining().to_string()));
        }
        if let (Some(h), Some(r)) = (&cfg.remaining_quota_tokens_header_name, &charge.quota) {
            ctx.response_headers
                .push((h.clone(), r.remaining().to_string()));
        }
        if let Some(h) = &cfg.tokens_consumed_header_name {
            ctx.response_headers.push((h.clone(), prompt.to_string()));
        }
        ctx.token_charges.push(charge);
        Ok(())
    }

    /// The response head arrived: start reading usage from 2xx bodies.
    pub fn start_response(
        &self,
        ctx: &mut RequestContext,
        status: u16,
        content_type: Option<&str>,
        region: Option<std::sync::Arc<str>>,
    ) {
        ctx.upstream_status = status;
        ctx.backend_region = region;
        if !self.needs_usage || !(200..300).contains(&status) {
            return;
        }
        // Speech, images and file contents come back as bytes: no usage there.
        if content_type.is_some_and(is_binary_type) {
            return;
        }
        // `ctx.stream` is the one meaning of "stream" (see `stream_tag`); a
        // backend that answers a stream with JSON (it should not) is still
        // read as JSON.
        // An SSE answer is read as one even when the request's flag was not
        // seen (a multipart upload's `stream` form field: a streamed
        // transcription, whose `transcript.text.done` carries the usage).
        let event_stream = content_type.is_some_and(|c| c.starts_with("text/event-stream"));
        let sse = event_stream || (ctx.stream && content_type.is_none());
        let model = ctx
            .deployment
            .as_deref()
            .or_else(|| ctx.estimate.as_ref().and_then(|e| e.model.as_deref()))
            .unwrap_or("");
        let prompt = ctx.estimate.as_ref().map(|e| e.prompt_tokens).unwrap_or(0);
        // The answer's `id` is read only for a call that creates an object
        // the gateway must find again (affinity); chat answers skip it.
        let wants_id = ctx.owned.as_ref().is_some_and(|c| c.creates);
        let encoding = encoding_for_model(model);
        let scanner = if wants_id {
            UsageScanner::new(sse, encoding, prompt)
        } else {
            UsageScanner::usage_only(sse, encoding, prompt)
        };
        ctx.usage_scanner = Some(Box::new(scanner));
    }

    /// A chunk of the response body went by.
    pub fn response_chunk(&self, ctx: &mut RequestContext, chunk: &[u8]) {
        if let Some(s) = ctx.usage_scanner.as_mut() {
            s.feed(chunk);
        }
    }

    /// The exchange is over: charge the actual tokens, record metrics.
    /// `backend`: the name of the backend that answered, if any.
    pub async fn finish(&self, ctx: &mut RequestContext, shared: &Shared, backend: Option<&str>) {
        if !self.needs_usage {
            return;
        }
        if let Some(session) = ctx.realtime.as_ref() {
            // A Realtime session was charged response by response; the
            // handshake's reservation is given back.
            let (responses, total) = (session.responses, session.usage.total_tokens);
            // For the access log and the summaries; the metrics were
            // recorded response by response.
            ctx.usage = Some(session.usage);
            ctx.trace(Section::Outbound, "llm-token-usage", || {
                Val::obj([
                    (
                        "message",
                        "Token usage of the Realtime session, charged at each response.".into(),
                    ),
                    ("responses", responses.into()),
                    ("totalTokens", total.into()),
                ])
            });
            for charge in std::mem::take(&mut ctx.token_charges) {
                for r in [&charge.tpm, &charge.quota].into_iter().flatten() {
                    shared.store.reconcile(r, 0).await;
                }
            }
            return;
        }
        let usage = ctx.usage_scanner.as_mut().and_then(|s| s.finish());
        ctx.usage = usage.map(|(u, _)| u);
        let answered_ok = (200..300).contains(&ctx.upstream_status);
        if ctx.trace.is_some() {
            let data = match (&usage, answered_ok) {
                (Some((u, source)), _) => Val::obj([
                    ("message", "Token usage of the response.".into()),
                    ("source", Val::from(format!("{source:?}").to_lowercase())),
                    ("promptTokens", u.prompt_tokens.into()),
                    ("completionTokens", u.completion_tokens.into()),
                    ("totalTokens", u.total_tokens.into()),
                ]),
                (None, true) => {
                    "The response reported no usage: the reservation is kept as the charge.".into()
                }
                (None, false) => "The call failed: no tokens are charged.".into(),
            };
            ctx.trace(Section::Outbound, "llm-token-usage", || data);
        }
        for charge in std::mem::take(&mut ctx.token_charges) {
            // Reported/counted tokens; a failed or refused call consumed
            // none; a success whose usage is unknown keeps its reservation.
            let actual = match (&ctx.usage, answered_ok) {
                (Some(u), _) => u.total_tokens,
                (None, true) => charge.reserved,
                (None, false) => 0,
            };
            if let Some(r) = &charge.tpm {
                shared.store.reconcile(r, actual).await;
            }
            if let Some(r) = &charge.quota {
                shared.store.reconcile(r, actual).await;
            }
        }
        if let Some(u) = ctx.usage {
            self.record_usage(ctx, shared, backend, &u);
        }
    }

    /// The token counters the request reserved on (a Realtime handshake's),
    /// each with whether it is a quota: a session's responses are charged to
    /// them as they complete.
    pub fn session_counters(&self, ctx: &RequestContext) -> Vec<crate::realtime::SessionCounter> {
        let mut out = Vec::new();
        for charge in &ctx.token_charges {
            for (r, quota) in [(&charge.tpm, false), (&charge.quota, true)] {
                if let Some(r) = r {
                    out.push(crate::realtime::SessionCounter {
                        key: r.key().to_string(),
                        limit: r.limit().clone(),
                        quota,
                    });
                }
            }
        }
        out
    }

    /// Record token metrics for one exchange (or one Realtime response).
    pub fn record_usage(
        &self,
        ctx: &RequestContext,
        shared: &Shared,
        backend: Option<&str>,
        u: &sluice_tokens::Usage,
    ) {
        let Some(metrics) = &shared.metrics else {
            return;
        };
        for step in &self.steps {
            let Step::Metric(dims) = step else { continue };
            metrics.record(
                |label| {
                    dims.iter()
                        .find(|d| d.same_label(label))
                        .map(|d| self.dimension_value(d, ctx, backend))
                },
                u.prompt_tokens,
                u.completion_tokens,
                u.total_tokens,
            );
        }
    }

    fn dimension_value<'a>(
        &'a self,
        d: &Dimension,
        ctx: &'a RequestContext,
        backend: Option<&'a str>,
    ) -> Cow<'a, str> {
        const NA: &str = "N/A";
        let or_na = |v: Option<&'a str>| Cow::Borrowed(v.unwrap_or(NA));
        match d {
            Dimension::Subscription => or_na(ctx.subscription.as_ref().map(|s| &*s.name)),
            Dimension::Api => Cow::Borrowed(&*self.api_name),
            Dimension::Deployment => or_na(ctx.deployment.as_deref()),
            Dimension::Backend => or_na(backend),
            Dimension::BackendRegion => or_na(ctx.backend_region.as_deref()),
            Dimension::ClientIp => ctx
                .client_ip
                .map_or(Cow::Borrowed(NA), |ip| Cow::Owned(ip.to_string())),
            Dimension::Identity => Cow::Owned(ctx.identity().unwrap_or_else(|| NA.to_string())),
            Dimension::Header(h) => or_na(
                ctx.metric_headers
                    .iter()
                    .find(|(n, _)| n == h)
                    .map(|(_, v)| v.as_str()),
            ),
        }
    }

    /// Header dimensions need request header values at the end of the
    /// exchange: the proxy copies them into the context at inbound.
    pub fn header_dimensions(&self) -> impl Iterator<Item = &HeaderName> {
        self.steps.iter().flat_map(|s| match s {
            Step::Metric(dims) => dims
                .iter()
                .filter_map(|d| match d {
                    Dimension::Header(h) => Some(h),
                    _ => None,
                })
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        })
    }
}

/// A validator for `validate_jwt` settings (also used for the management
/// listener's Entra ID operators).
pub fn jwt_validator(v: &sluice_config::ValidateJwt, fetch: Arc<dyn Fetch>) -> JwtValidator {
    JwtValidator::new(
        JwtSettings {
            keys_source: match &v.keys {
                JwtKeys::OpenIdConfiguration(u) => KeysSource::OpenIdConfiguration(u.clone()),
                JwtKeys::Jwks(u) => KeysSource::Jwks(u.clone()),
            },
            issuers: v.issuers.clone(),
            audiences: v.audiences.clone(),
            client_application_ids: v.client_application_ids.clone(),
            required_roles: v.required_roles.clone(),
            clock_skew: v.clock_skew,
            refetch_min_interval: Duration::from_secs(30),
        },
        fetch,
    )
}

/// A limit's decision, for a trace.
fn limit_trace(
    key: &str,
    limit: &Limit,
    result: &'static str,
    remaining: Option<u64>,
    retry_after: Option<Duration>,
) -> Val {
    let window = match limit.window {
        Window::Sliding(d) => format!("{} s sliding", d.as_secs()),
        Window::Fixed(d) => format!("{} s fixed", d.as_secs()),
        Window::Calendar(p) => format!("{p:?}").to_lowercase(),
    };
    Val::obj([
        ("counterKey", Val::from(key.to_string())),
        ("limit", limit.limit.into()),
        ("window", window.into()),
        ("result", result.into()),
        ("remaining", remaining.into()),
        (
            "retryAfterSeconds",
            retry_after.map(retry_after_secs).into(),
        ),
    ])
}

/// An accepted JWT, for a trace: what was checked and who the caller is
/// (never the token itself).
fn jwt_accepted(settings: &JwtSettings, caller: &sluice_auth::Caller) -> Val {
    let roles = caller
        .claims
        .get("roles")
        .and_then(|r| r.as_array())
        .map(|r| {
            r.iter()
                .filter_map(|x| x.as_str().map(|s| Val::from(s.to_string())))
                .collect()
        })
        .unwrap_or_default();
    // A claim that is a string, or a list of strings (`aud` may be either).
    let claim = |n: &str| match caller.claims.get(n) {
        Some(serde_json::Value::String(s)) => Val::from(s.clone()),
        Some(serde_json::Value::Array(items)) => Val::Arr(
            items
                .iter()
                .filter_map(|x| x.as_str().map(|s| Val::from(s.to_string())))
                .collect(),
        ),
        _ => Val::Null,
    };
    Val::obj([
        ("message", "The JWT was validated.".into()),
        ("issuer", claim("iss")),
        ("audience", claim("aud")),
        ("subject", Val::from(caller.subject.clone())),
        ("appId", Val::from(caller.app_id.clone())),
        ("roles", Val::Arr(roles)),
        (
            "requiredRoles",
            Val::Arr(
                settings
                    .required_roles
                    .iter()
                    .map(|r| Val::from(r.clone()))
                    .collect(),
            ),
        ),
    ])
}

/// Bodies larger than this are tokenized on the blocking pool, off the
/// proxy's worker threads.
const BLOCKING_ESTIMATE_BYTES: usize = 8 * 1024;

/// Estimate the prompt of a body read before routing (after authentication
/// and only when a step needs it: tokenizing costs ~µs per 100 bytes).
async fn estimate(req: &InboundRequest<'_>, ctx: &mut RequestContext) {
    let Some(body) = req.body else { return };
    if body.len() <= BLOCKING_ESTIMATE_BYTES {
        let op = ctx.operation.unwrap_or(Operation::Other);
        let e = estimate_request(op, ctx.deployment.as_deref(), body);
        set_estimate(ctx, e);
    } else {
        estimate_owned(ctx, body.to_vec()).await;
    }
}

/// Estimate on tokio's blocking pool, off the proxy's worker threads.
async fn estimate_owned(ctx: &mut RequestContext, body: Vec<u8>) {
    let op = ctx.operation.unwrap_or(Operation::Other);
    let deployment = ctx.deployment.clone();
    if let Ok(e) =
        tokio::task::spawn_blocking(move || estimate_request(op, deployment.as_deref(), &body))
            .await
    {
        set_estimate(ctx, e);
    }
}

fn set_estimate(ctx: &mut RequestContext, e: sluice_tokens::RequestEstimate) {
    if ctx.deployment.is_none() {
        ctx.deployment = e.model.clone();
    }
    ctx.estimate = Some(e);
}

fn calls(c: &CallLimit, quota: bool) -> Step {
    Step::Calls {
        limit: Limit {
            limit: c.calls,
            window: if quota {
                Window::Fixed(c.renewal_period)
            } else {
                Window::Sliding(c.renewal_period)
            },
        },
        key: c.counter_key.clone(),
        quota,
    }
}

/// APIM's 401 for a refused token; the message says what failed and never
/// repeats the token.
fn jwt_error(e: &JwtError) -> GatewayError {
    // Keys that cannot be fetched are the gateway's problem, not the
    // caller's: 503, which clients retry, rather than 401.
    let status = if *e == JwtError::KeysUnavailable {
        503
    } else {
        401
    };
    GatewayError::new(status, e.to_string())
}

/// What a `token_limit` step reserves at admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReservationPlan {
    prompt: u64,
    completion: u64,
}

impl ReservationPlan {
    fn total(self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// The tokens a request may use, reserved before it is forwarded so that
/// concurrent requests cannot together overrun a limit: the prompt estimate
/// plus the completion the request allows (`max_completion_tokens`,
/// `max_tokens` or `max_output_tokens`, times `n`). Chat, completions and
/// Responses calls that name no maximum are given `default_completion` per choice,
/// lowered so the reservation fits `smallest_limit` (a request that names
/// nothing is never refused for that default alone). Embeddings generate
/// nothing; other operations reserve only an explicit maximum.
///
/// A request whose reservation cannot fit the smallest of its limits even
/// in an empty window gets a 400: waiting would never cure it.
fn reservation(
    prompt: u64,
    op: Operation,
    estimate: Option<&sluice_tokens::RequestEstimate>,
    default_completion: u64,
    smallest_limit: u64,
) -> Result<ReservationPlan, GatewayError> {
    let choices = u64::from(estimate.and_then(|e| e.choices).unwrap_or(1));
    let explicit = estimate.and_then(|e| e.max_completion_tokens);
    let completion = match (op, explicit) {
        (Operation::Embeddings, _) => 0,
        (_, Some(max)) => u64::from(max).saturating_mul(choices),
        (Operation::ChatCompletions | Operation::Completions | Operation::Responses, None) => {
            default_completion
                .saturating_mul(choices)
                .min(smallest_limit.saturating_sub(prompt))
        }
        (Operation::Other, None) => 0,
    };
    let plan = ReservationPlan { prompt, completion };
    if plan.total() > smallest_limit {
        return Err(GatewayError::new(
            400,
            format!(
                "Token limit is exceeded: this request may use up to {} tokens (about {} in the prompt and up to {} in the completion), more than the limit of {} tokens allows. Waiting will not help: lower max_tokens or shorten the prompt.",
                plan.total(),
                plan.prompt,
                plan.completion,
                smallest_limit
            ),
        ));
    }
    Ok(plan)
}

/// A content type whose body is bytes, never JSON or SSE (audio from
/// `audio/speech`, images, file contents).
fn is_binary_type(content_type: &str) -> bool {
    let c = content_type.trim_start().as_bytes();
    ["audio/", "image/", "video/", "application/octet-stream"]
        .iter()
        .any(|p| c.len() >= p.len() && c[..p.len()].eq_ignore_ascii_case(p.as_bytes()))
}

/// The counter a request is charged to. Keys are namespaced by what they
/// are (`sub:`, `ip:`, `hdr:`, `claim:`, `id:`) so values of different kinds
/// never share a counter; `kind` separates call and token counters. Values
/// that come from the client (identity, address, header, claim) are hashed
/// to a fixed size with a hash that is the same in every process
/// ([`sluice_limits::client_key`]), so a long or hostile value costs no more
/// memory than a short one and replicas agree on the key. Subscription
/// names come from the config and stay readable.
fn counter_key(
    key: &CounterKey,
    req: &InboundRequest<'_>,
    ctx: &RequestContext,
    kind: &str,
) -> String {
    match key {
        CounterKey::Subscription => {
            // `{kind}|sub:{name}`, built without the formatting machinery (every request).
            let name = ctx.subscription.as_ref().map(|s| &*s.name).unwrap_or("");
            let mut k = String::with_capacity(kind.len() + 5 + name.len());
            k.push_str(kind);
            k.push_str("|sub:");
            k.push_str(name);
            k
        }
        CounterKey::Identity => {
            client_key(kind, "id", ctx.identity().unwrap_or_default().as_bytes())
        }
        CounterKey::ClientIp => {
            let ip = req.client_ip.map(|i| i.to_string()).unwrap_or_default();
            client_key(kind, "ip", ip.as_bytes())
        }
        CounterKey::Header(h) => client_key(
            kind,
            &format!("hdr:{}", h.as_str()),
            req.headers.get(h).map(|v| v.as_bytes()).unwrap_or(b""),
        ),
        CounterKey::Claim(c) => client_key(
            kind,
            &format!("claim:{c}"),
            ctx.caller
                .as_ref()
                .and_then(|caller| caller.claim_str(c))
                .unwrap_or_default()
                .as_bytes(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use sluice_limits::{ManualClock, MemoryStore};

    #[derive(Debug)]
    struct NoFetch;

    #[async_trait::async_trait]
    impl Fetch for NoFetch {
        async fn get(&self, _url: &str) -> Result<Vec<u8>, String> {
            Err("no network in unit tests".into())
        }
    }

    fn setup(policies: &str) -> (ApiPipeline, Shared, Arc<MemoryStore>) {
        setup_api("", policies)
    }

    /// `api`: more keys of the API (each line indented by four spaces).
    fn setup_api(api: &str, policies: &str) -> (ApiPipeline, Shared, Arc<MemoryStore>) {
        let yaml = format!(
            "server: {{management: {{listen: '127.0.0.1:0'}}}}\n\
             backends: [{{name: b, url: 'http://127.0.0.1:1'}}]\n\
             subscriptions: [{{name: team-a, primary_key: {{env: K}}}}]\n\
             apis:\n  - name: api\n    path: /openai\n    backends: [b]\n{api}    policies:\n{policies}"
        );
        let env = |n: &str| (n == "K").then(|| "key-a".to_string());
        let cfg =
            sluice_config::load_str_with_env(&yaml, "t.yaml", std::path::Path::new("."), &env)
                .unwrap_or_else(|e| panic!("{e}"));
        let store = Arc::new(MemoryStore::new(Arc::new(ManualClock::from_millis(
            1_700_000_000_000,
        ))));
        let shared = Shared {
            subscriptions: Arc::new(SubscriptionIndex::new(&cfg.subscriptions)),
            store: store.clone(),
            metrics: None,
        };
        (
            ApiPipeline::new(&cfg.apis[0], Arc::new(NoFetch)),
            shared,
            store,
        )
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const CHAT: &str = "/deployments/gpt-4o/chat/completions";

    /// Every step of a request without a body, from a fresh context.
    async fn bodiless(p: &ApiPipeline, shared: &Shared, h: &HeaderMap) -> Result<(), GatewayError> {
        p.inbound(&request(h, None), &mut RequestContext::default(), shared)
            .await
    }

    fn request<'a>(h: &'a HeaderMap, body: Option<&'a [u8]>) -> InboundRequest<'a> {
        InboundRequest {
            headers: h,
            query: None,
            client_ip: Some("10.0.0.7".parse().unwrap()),
            rest_path: CHAT,
            body,
        }
    }

    #[tokio::test]
    async fn tokens_are_reserved_then_reconciled_to_the_reported_usage() {
        let (p, shared, store) = setup(
            "      - token_limit: {counter_key: subscription, tokens_per_minute: 1000, remaining_tokens_header_name: x-rem, tokens_consumed_header_name: x-used}\n",
        );
        let h = headers(&[("api-key", "key-a")]);
        let body = br#"{"messages":[{"role":"user","content":"Hello there!"}],"max_tokens":40}"#;
        let mut ctx = RequestContext::default();
        p.inbound(&request(&h, Some(body)), &mut ctx, &shared)
            .await
            .unwrap();
        let est = ctx.estimate.as_ref().unwrap().prompt_tokens;
        assert_eq!(est, 10);
        // Consumed: the prompt estimate; reserved: prompt plus max_tokens.
        assert!(
            ctx.response_headers
                .contains(&(HeaderName::from_static("x-used"), "10".into()))
        );
        assert!(
            ctx.response_headers
                .contains(&(HeaderName::from_static("x-rem"), "950".into()))
        );
        p.start_response(
            &mut ctx,
            200,
            Some("application/json"),
            Some("East US".into()),
        );
        p.response_chunk(
            &mut ctx,
            br#"{"usage":{"prompt_tokens":10,"completion_tokens":25,"total_tokens":35}}"#,
        );
        p.finish(&mut ctx, &shared, Some("b")).await;
        let limit = Limit {
            limit: 1000,
            window: Window::Sliding(Duration::from_secs(60)),
        };
        assert_eq!(store.peek("tokens|sub:team-a", &limit).await.used, 35);
    }

    #[tokio::test]
    async fn v1_paths_take_the_key_from_a_bearer() {
        let (p, shared, _) = setup("      []\n");
        let h = headers(&[("authorization", "Bearer key-a")]);
        let v1 = |h: &'static HeaderMap, path: &'static str| InboundRequest {
            rest_path: path,
            ..request(h, None)
        };
        let h: &'static HeaderMap = Box::leak(Box::new(h));
        let mut ctx = RequestContext::default();
        p.inbound(&v1(h, "/v1/chat/completions"), &mut ctx, &shared)
            .await
            .unwrap();
        assert_eq!(ctx.subscription.as_ref().map(|s| &*s.name), Some("team-a"));
        // The deployments form keeps APIM's rule: the key is in api-key.
        let mut ctx = RequestContext::default();
        let e = p
            .inbound(&v1(h, CHAT), &mut ctx, &shared)
            .await
            .unwrap_err();
        assert_eq!(e.status, 401);
        assert!(e.message.contains("missing subscription key"));
        // A wrong bearer key on v1 is an invalid key.
        let bad: &'static HeaderMap =
            Box::leak(Box::new(headers(&[("authorization", "Bearer nope")])));
        let e = p
            .inbound(
                &v1(bad, "/v1/embeddings"),
                &mut RequestContext::default(),
                &shared,
            )
            .await
            .unwrap_err();
        assert!(e.message.contains("invalid subscription key"));
    }

    /// The entries a traced context recorded: (section, source, data).
    fn recorded(ctx: &RequestContext) -> Vec<(String, serde_json::Value)> {
        let t = ctx.trace.as_ref().expect("traced").to_trace("s", "id");
        let v = serde_json::to_value(&t).unwrap();
        let mut out = Vec::new();
        for section in ["inbound", "backend", "outbound", "on-error"] {
            for e in v["traceEntries"][section].as_array().into_iter().flatten() {
                out.push((
                    format!("{section}/{}", e["source"].as_str().unwrap()),
                    e["data"].clone(),
                ));
            }
        }
        out
    }

    fn traced() -> RequestContext {
        RequestContext {
            trace: Some(Box::new(sluice_trace::record::Recorder::new(
                std::time::Instant::now(),
            ))),
            ..RequestContext::default()
        }
    }

    #[tokio::test]
    async fn a_traced_request_records_each_decision() {
        let (p, shared, _) = setup(
            "      - rate_limit: {calls: 5, renewal_period_seconds: 60, counter_key: subscription}\n\
             \x20     - quota: {calls: 9, renewal_period_seconds: 3600, counter_key: subscription}\n\
             \x20     - token_limit: {counter_key: subscription, tokens_per_minute: 1000, token_quota: 5000, token_quota_period: daily, estimate_prompt_tokens: true}\n",
        );
        let h = headers(&[("api-key", "key-a")]);
        let body = br#"{"messages":[{"role":"user","content":"Hello there!"}],"max_tokens":40}"#;
        let mut ctx = traced();
        p.inbound(&request(&h, Some(body)), &mut ctx, &shared)
            .await
            .unwrap();
        p.start_response(&mut ctx, 200, Some("application/json"), None);
        p.response_chunk(
            &mut ctx,
            br#"{"usage":{"prompt_tokens":10,"completion_tokens":25,"total_tokens":35}}"#,
        );
        p.finish(&mut ctx, &shared, Some("b")).await;
        let r = recorded(&ctx);
        let names: Vec<&str> = r.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "inbound/subscription-key",
                "inbound/rate-limit",
                "inbound/quota",
                "inbound/llm-token-limit",
                "inbound/llm-token-limit",
                "inbound/llm-token-limit",
                "outbound/llm-token-usage",
            ]
        );
        assert_eq!(r[0].1["subscription"], "team-a");
        assert_eq!(r[0].1["key"], "primary");
        let rate = &r[1].1;
        assert_eq!(
            (&rate["result"], &rate["limit"], &rate["remaining"]),
            (&"accepted".into(), &5.into(), &4.into())
        );
        assert_eq!(rate["window"], "60 s sliding");
        assert_eq!(rate["counterKey"], "calls|sub:team-a");
        assert_eq!(r[2].1["window"], "3600 s fixed");
        assert_eq!(r[3].1["estimatedPromptTokens"], 10);
        assert_eq!(r[3].1["promptTokensCharged"], 10);
        assert_eq!(r[3].1["tokensReserved"], 50);
        assert_eq!(r[4].1["remaining"], 950);
        assert_eq!(r[4].1["window"], "60 s sliding");
        assert_eq!(r[5].1["window"], "daily");
        assert_eq!(r[5].1["remaining"], 4950);
        let usage = &r[6].1;
        assert_eq!(
            (&usage["totalTokens"], &usage["source"]),
            (&35.into(), &"reported".into())
        );
    }

    #[tokio::test]
    async fn a_traced_refusal_says_why() {
        let (p, shared, _) = setup(
            "      - rate_limit: {calls: 1, renewal_period_seconds: 60, counter_key: subscription}\n",
        );
        let h = headers(&[("api-key", "key-a")]);
        let mut ctx = traced();
        p.inbound(&request(&h, None), &mut ctx, &shared)
            .await
            .unwrap();
        let mut ctx = traced();
        let err = p
            .inbound(&request(&h, None), &mut ctx, &shared)
            .await
            .unwrap_err();
        assert_eq!(err.status, 429);
        let r = recorded(&ctx);
        assert_eq!(r[1].0, "inbound/rate-limit");
        assert_eq!(r[1].1["result"], "refused");
        assert_eq!(r[1].1["remaining"], serde_json::Value::Null);
        assert!(r[1].1["retryAfterSeconds"].as_u64().unwrap() > 0);
        // A wrong key: the refusal, and never the key.
        let h = headers(&[("api-key", "wrong-key-123")]);
        let mut ctx = traced();
        p.inbound(&request(&h, None), &mut ctx, &shared)
            .await
            .unwrap_err();
        let r = recorded(&ctx);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1["result"], "refused");
        assert!(
            r[0].1["message"]
                .as_str()
                .unwrap()
                .contains("invalid subscription key")
        );
        assert!(!format!("{r:?}").contains("wrong-key-123"));
        // A failed call is charged nothing, and says so.
        let (p, shared, _) =
            setup("      - token_limit: {counter_key: subscription, tokens_per_minute: 100000}\n");
        let h = headers(&[("api-key", "key-a")]);
        let mut ctx = traced();
        p.inbound(&request(&h, Some(b"{}")), &mut ctx, &shared)
            .await
            .unwrap();
        p.start_response(&mut ctx, 500, None, None);
        p.finish(&mut ctx, &shared, None).await;
        let last = recorded(&ctx).pop().unwrap();
        assert_eq!(last.1, "The call failed: no tokens are charged.");
        // A success without usage keeps the reservation.
        let mut ctx = traced();
        p.inbound(&request(&h, Some(b"{}")), &mut ctx, &shared)
            .await
            .unwrap();
        p.start_response(&mut ctx, 200, Some("application/json"), None);
        p.response_chunk(&mut ctx, b"{}");
        p.finish(&mut ctx, &shared, None).await;
        let last = recorded(&ctx).pop().unwrap();
        assert!(last.1.as_str().unwrap().contains("reservation is kept"));
        // Untraced, nothing is recorded and nothing is built.
        let mut ctx = RequestContext::default();
        p.inbound(&request(&h, Some(b"{}")), &mut ctx, &shared)
            .await
            .unwrap();
        assert!(ctx.trace.is_none());
    }

    #[tokio::test]
    async fn a_failed_call_is_charged_nothing() {
        let (p, shared, store) =
            setup("      - token_limit: {counter_key: client_ip, tokens_per_minute: 1000}\n");
        let h = headers(&[("api-key", "key-a")]);
        let mut ctx = RequestContext::default();
        let body = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
        p.inbound(&request(&h, Some(body)), &mut ctx, &shared)
            .await
            .unwrap();
        p.start_response(&mut ctx, 429, Some("application/json"), None);
        p.finish(&mut ctx, &shared, None).await;
        let limit = Limit {
            limit: 1000,
            window: Window::Sliding(Duration::from_secs(60)),
        };
        assert_eq!(store.peek("tokens|ip:10.0.0.7", &limit).await.used, 0);
    }

    #[tokio::test]
    async fn rate_limit_and_quota_answer_like_apim() {
        let (p, shared, _) = setup(
            "      - rate_limit: {calls: 2, renewal_period_seconds: 10, counter_key: 'header:x-team'}\n\
             \x20     - quota: {calls: 3, renewal_period_seconds: 3600, counter_key: subscription}\n",
        );
        let h = headers(&[("api-key", "key-a"), ("x-team", "red")]);
        for _ in 0..2 {
            p.inbound(&request(&h, None), &mut RequestContext::default(), &shared)
                .await
                .unwrap();
        }
        let e = p
            .inbound(&request(&h, None), &mut RequestContext::default(), &shared)
            .await
            .unwrap_err();
        assert_eq!(e.status, 429);
        assert_eq!(
            e.message,
            "Rate limit is exceeded. Try again in 10 seconds."
        );
        assert_eq!(e.headers[0].1, "10");
        // Another header value has its own counter; the quota (per subscription) then runs out.
        let h2 = headers(&[("api-key", "key-a"), ("x-team", "blue")]);
        p.inbound(&request(&h2, None), &mut RequestContext::default(), &shared)
            .await
            .unwrap();
        let e = p
            .inbound(&request(&h2, None), &mut RequestContext::default(), &shared)
            .await
            .unwrap_err();
        assert_eq!(e.status, 403);
        assert!(
            e.message
                .starts_with("Out of call volume quota. Quota will be replenished in "),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn authentication_comes_first() {
        let (p, shared, _) = setup(
            "      - rate_limit: {calls: 1, renewal_period_seconds: 10, counter_key: subscription}\n",
        );
        let e = bodiless(&p, &shared, &headers(&[("host", "gw")]))
            .await
            .unwrap_err();
        assert_eq!(e.status, 401);
        assert!(e.headers[0].1.contains("realm=\"http://gw/openai\""));
        // Without a Host, the realm names localhost.
        let e = bodiless(&p, &shared, &headers(&[])).await.unwrap_err();
        assert!(e.headers[0].1.contains("realm=\"http://localhost/openai\""));
    }

    #[tokio::test]
    async fn a_reservation_is_returned_when_a_later_step_refuses() {
        let (p, shared, store) = setup(
            "      - token_limit: {counter_key: subscription, tokens_per_minute: 1000}\n\
             \x20     - rate_limit: {calls: 1, renewal_period_seconds: 10, counter_key: subscription}\n",
        );
        let h = headers(&[("api-key", "key-a")]);
        let body = br#"{"messages":[{"role":"user","content":"Hello there!"}],"max_tokens":5}"#;
        let limit = Limit {
            limit: 1000,
            window: Window::Sliding(Duration::from_secs(60)),
        };
        let mut first = RequestContext::default();
        p.inbound(&request(&h, Some(body)), &mut first, &shared)
            .await
            .unwrap();
        let mut second = RequestContext::default();
        let e = p
            .inbound(&request(&h, Some(body)), &mut second, &shared)
            .await
            .unwrap_err();
        assert_eq!(e.status, 429);
        assert_eq!(
            store.peek("tokens|sub:team-a", &limit).await.used,
            30,
            "both reserved 10 + 5"
        );
        // The refused request ends without a backend answer: its tokens come back.
        p.finish(&mut second, &shared, None).await;
        assert_eq!(store.peek("tokens|sub:team-a", &limit).await.used, 15);
    }

    #[tokio::test]
    async fn token_limit_refuses_then_admits_after_retry_after() {
        let clock = Arc::new(ManualClock::from_millis(1_700_000_000_000));
        let (p, mut shared, _) =
            setup("      - token_limit: {counter_key: subscription, tokens_per_minute: 100}\n");
        shared.store = Arc::new(MemoryStore::new(clock.clone()));
        let h = headers(&[("api-key", "key-a")]);
        let body = br#"{"messages":[{"role":"user","content":"Hello there!"}]}"#;
        let mut ctx = RequestContext::default();
        p.inbound(&request(&h, Some(body)), &mut ctx, &shared)
            .await
            .unwrap();
        p.start_response(&mut ctx, 200, Some("application/json"), None);
        p.response_chunk(
            &mut ctx,
            br#"{"usage":{"prompt_tokens":10,"completion_tokens":90,"total_tokens":100}}"#,
        );
        p.finish(&mut ctx, &shared, None).await;
        let e = p
            .inbound(
                &request(&h, Some(body)),
                &mut RequestContext::default(),
                &shared,
            )
            .await
            .unwrap_err();
        assert_eq!(e.status, 429);
        let secs: u64 = e.headers[0].1.parse().unwrap();
        assert_eq!(
            e.message,
            format!("Token limit is exceeded. Try again in {secs} seconds.")
        );
        assert!((1..=60).contains(&secs));
        clock.advance(Duration::from_secs(secs));
        p.inbound(
            &request(&h, Some(body)),
            &mut RequestContext::default(),
            &shared,
        )
        .await
        .expect("admitted once Retry-After has passed");
    }

    #[test]
    fn counter_keys_of_different_kinds_never_collide() {
        let h = headers(&[("x-team", "team-a")]);
        let ctx = RequestContext {
            subscription: Some(crate::SubscriptionMatch {
                index: 0,
                name: Arc::from("team-a"),
                slot: crate::subscription::KeySlot::Primary,
            }),
            ..RequestContext::default()
        };
        let req = request(&h, None);
        let by_sub = counter_key(&CounterKey::Subscription, &req, &ctx, "calls");
        let by_hdr = counter_key(
            &CounterKey::Header(HeaderName::from_static("x-team")),
            &req,
            &ctx,
            "calls",
        );
        let by_id = counter_key(&CounterKey::Identity, &req, &ctx, "calls");
        assert_ne!(by_sub, by_hdr);
        assert_ne!(by_sub, by_id);
        assert_ne!(
            by_sub,
            counter_key(&CounterKey::Subscription, &req, &ctx, "tokens")
        );
    }

    fn estimate_with(max: Option<u32>, choices: Option<u32>) -> sluice_tokens::RequestEstimate {
        sluice_tokens::RequestEstimate {
            prompt_tokens: 10,
            max_completion_tokens: max,
            choices,
            ..Default::default()
        }
    }

    #[test]
    fn reservations_cover_the_completion_the_request_allows() {
        let chat = Operation::ChatCompletions;
        let plan = |op, e: Option<&sluice_tokens::RequestEstimate>, limit| {
            reservation(10, op, e, 100, limit).map(ReservationPlan::total)
        };
        // max_tokens times n.
        let e = estimate_with(Some(50), Some(3));
        assert_eq!(plan(chat, Some(&e), 1000).unwrap(), 160);
        // No maximum: the default, per choice.
        let e = estimate_with(None, Some(2));
        assert_eq!(plan(chat, Some(&e), 1000).unwrap(), 210);
        assert_eq!(plan(Operation::Completions, None, 1000).unwrap(), 110);
        // ... lowered to fit the limit, never refused for the default alone.
        assert_eq!(plan(chat, Some(&e), 50).unwrap(), 50);
        assert_eq!(plan(chat, Some(&e), 10).unwrap(), 10);
        // Embeddings generate nothing; other operations only what they name.
        let e = estimate_with(Some(50), None);
        assert_eq!(plan(Operation::Embeddings, Some(&e), 1000).unwrap(), 10);
        assert_eq!(plan(Operation::Other, Some(&e), 1000).unwrap(), 60);
        assert_eq!(plan(Operation::Other, None, 1000).unwrap(), 10);
        // Exactly at the limit fits; one more is a 400, not a 429.
        assert_eq!(plan(chat, Some(&e), 60).unwrap(), 60);
        let err = plan(chat, Some(&e), 59).unwrap_err();
        assert_eq!(err.status, 400);
        assert_eq!(
            err.message,
            "Token limit is exceeded: this request may use up to 60 tokens (about 10 in the prompt and up to 50 in the completion), more than the limit of 59 tokens allows. Waiting will not help: lower max_tokens or shorten the prompt."
        );
        // A prompt alone over the limit.
        assert_eq!(
            plan(Operation::Embeddings, None, 9).unwrap_err().status,
            400
        );
        // Absurd requests do not overflow.
        let e = estimate_with(Some(u32::MAX), Some(u32::MAX));
        let most = u64::from(u32::MAX) * u64::from(u32::MAX);
        assert_eq!(plan(chat, Some(&e), u64::MAX).unwrap(), 10 + most);
        assert_eq!(
            reservation(u64::MAX, chat, Some(&e), 1, u64::MAX)
                .unwrap()
                .total(),
            u64::MAX
        );
    }

    #[tokio::test]
    async fn concurrent_reservations_hold_the_limit() {
        let (p, shared, store) =
            setup("      - token_limit: {counter_key: subscription, tokens_per_minute: 500}\n");
        let h = headers(&[("api-key", "key-a")]);
        let body = br#"{"messages":[{"role":"user","content":"Hello there!"}],"max_tokens":100}"#;
        // Nobody has answered yet: each admitted request holds 110 tokens.
        let mut admitted = Vec::new();
        let mut refused = 0;
        for _ in 0..10 {
            let mut ctx = RequestContext::default();
            match p.inbound(&request(&h, Some(body)), &mut ctx, &shared).await {
                Ok(()) => admitted.push(ctx),
                Err(e) => {
                    assert_eq!(e.status, 429);
                    refused += 1;
                }
            }
        }
        assert_eq!((admitted.len(), refused), (4, 6));
        let limit = Limit {
            limit: 500,
            window: Window::Sliding(Duration::from_secs(60)),
        };
        assert_eq!(store.peek("tokens|sub:team-a", &limit).await.used, 440);
        // Each used less than it could: the counter comes down to the usage.
        for mut ctx in admitted {
            p.start_response(&mut ctx, 200, Some("application/json"), None);
            p.response_chunk(
                &mut ctx,
                br#"{"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#,
            );
            p.finish(&mut ctx, &shared, None).await;
        }
        assert_eq!(store.peek("tokens|sub:team-a", &limit).await.used, 120);
    }

    #[tokio::test]
    async fn a_success_without_usage_keeps_its_whole_reservation() {
        let (p, shared, store) =
            setup("      - token_limit: {counter_key: subscription, tokens_per_minute: 500}\n");
        let h = headers(&[("api-key", "key-a")]);
        let body = br#"{"messages":[{"role":"user","content":"Hello there!"}],"max_tokens":30}"#;
        let mut ctx = RequestContext::default();
        p.inbound(&request(&h, Some(body)), &mut ctx, &shared)
            .await
            .unwrap();
        p.start_response(&mut ctx, 200, Some("application/json"), None);
        p.response_chunk(&mut ctx, b"{}");
        p.finish(&mut ctx, &shared, None).await;
        let limit = Limit {
            limit: 500,
            window: Window::Sliding(Duration::from_secs(60)),
        };
        assert_eq!(store.peek("tokens|sub:team-a", &limit).await.used, 40);
    }

    #[tokio::test]
    async fn the_stream_flag_decides_estimating_and_usage_reading() {
        // estimate_prompt_tokens off: only streams have their prompt charged.
        let (p, shared, _) = setup(
            "      - token_limit: {counter_key: subscription, tokens_per_minute: 5000, estimate_prompt_tokens: false, tokens_consumed_header_name: x-used}\n",
        );
        let h = headers(&[("api-key", "key-a")]);
        let consumed = |ctx: &RequestContext| {
            ctx.response_headers
                .iter()
                .find(|(n, _)| n == "x-used")
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        for (body, stream, charged) in [
            (
                &br#"{"messages":[{"role":"user","content":"Hello there!"}],"stream":true}"#[..],
                true,
                "10",
            ),
            (
                br#"{"messages":[{"role":"user","content":"Hello there!"}],"stream":"TRUE"}"#,
                true,
                "10",
            ),
            (
                br#"{"messages":[{"role":"user","content":"Hello there!"}],"stream":false}"#,
                false,
                "0",
            ),
            (
                br#"{"messages":[{"role":"user","content":"Hello there!"}]}"#,
                false,
                "0",
            ),
        ] {
            // The proxy sets the flag from the one function that decides it.
            let mut ctx = RequestContext {
                stream: crate::stream_flag(body),
                ..RequestContext::default()
            };
            assert_eq!(ctx.stream, stream);
            p.inbound(&request(&h, Some(body)), &mut ctx, &shared)
                .await
                .unwrap();
            assert_eq!(consumed(&ctx), charged, "{}", String::from_utf8_lossy(body));
            // An SSE answer is read as SSE whatever the request said (a
            // multipart upload's `stream` field is not read); its content is
            // counted when it reports no usage.
            p.start_response(&mut ctx, 200, Some("text/event-stream"), None);
            p.response_chunk(
                &mut ctx,
                b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n",
            );
            p.finish(&mut ctx, &shared, None).await;
            assert!(ctx.usage.is_some(), "{}", String::from_utf8_lossy(body));
            // A JSON answer is read as JSON, also for a flagged stream.
            let mut again = RequestContext {
                stream,
                ..RequestContext::default()
            };
            p.start_response(&mut again, 200, Some("application/json"), None);
            p.response_chunk(&mut again, b"data: {\"choices\":[]}\n\n");
            p.finish(&mut again, &shared, None).await;
            assert!(again.usage.is_none(), "{}", String::from_utf8_lossy(body));
        }
    }

    #[tokio::test]
    async fn the_head_steps_run_without_the_body() {
        let (p, shared, store) = setup(
            "      - rate_limit: {calls: 1, renewal_period_seconds: 10, counter_key: subscription}\n\
             \x20     - token_limit: {counter_key: subscription, tokens_per_minute: 1000}\n\
             \x20     - quota: {calls: 1, renewal_period_seconds: 3600, counter_key: subscription}\n",
        );
        // No key: refused at the head, with no body at all.
        let mut ctx = RequestContext::default();
        let e = p
            .inbound_head(&request(&headers(&[]), None), &mut ctx, &shared)
            .await
            .unwrap_err();
        assert_eq!(e.status, 401);
        let h = headers(&[("api-key", "key-a")]);
        let mut ctx = RequestContext::default();
        p.inbound_head(&request(&h, None), &mut ctx, &shared)
            .await
            .unwrap();
        // The rate limit ran at the head; the token limit and the quota wait
        // for the body.
        assert!(ctx.token_charges.is_empty() && ctx.estimate.is_none());
        let calls = Limit {
            limit: 1,
            window: Window::Sliding(Duration::from_secs(10)),
        };
        assert_eq!(store.peek("calls|sub:team-a", &calls).await.used, 1);
        let quota = Limit {
            limit: 1,
            window: Window::Fixed(Duration::from_secs(3600)),
        };
        assert_eq!(store.peek("quota|sub:team-a", &quota).await.used, 0);
        let body = br#"{"messages":[{"role":"user","content":"Hello there!"}],"max_tokens":5}"#;
        p.inbound_body(&request(&h, Some(body)), &mut ctx, &shared)
            .await
            .unwrap();
        assert_eq!(ctx.token_charges.len(), 1);
        assert_eq!(ctx.token_charges[0].reserved, 15);
        assert_eq!(store.peek("quota|sub:team-a", &quota).await.used, 1);
        // A second call is refused at the head, before any body is read.
        let e = p
            .inbound_head(&request(&h, None), &mut RequestContext::default(), &shared)
            .await
            .unwrap_err();
        assert_eq!(e.status, 429);
    }

    #[test]
    fn client_derived_counter_keys_are_hashed_to_a_fixed_size() {
        let long = "x".repeat(10_000);
        let h = headers(&[("x-team", long.as_str())]);
        let ctx = RequestContext::default();
        let req = request(&h, None);
        let k = counter_key(
            &CounterKey::Header(HeaderName::from_static("x-team")),
            &req,
            &ctx,
            "calls",
        );
        assert!(k.len() < 64 && !k.contains(&long), "{k}");
        assert_eq!(k, client_key("calls", "hdr:x-team", long.as_bytes()));
        let ip = counter_key(&CounterKey::ClientIp, &req, &ctx, "calls");
        assert_eq!(ip, client_key("calls", "ip", b"10.0.0.7"));
        assert!(!ip.contains("10.0.0.7"));
    }

    const JWKS: &str = "      - validate_jwt: {jwks_url: 'http://127.0.0.1:1/keys', issuers: [i], audiences: [a]}\n";

    #[tokio::test]
    async fn a_jwt_step_binds_key_callers_too_unless_the_api_takes_either() {
        // auth: key plus validate_jwt: both are required.
        let (p, shared, _) = setup(JWKS);
        let h = headers(&[("api-key", "key-a")]);
        let e = p
            .inbound(&request(&h, None), &mut RequestContext::default(), &shared)
            .await
            .unwrap_err();
        assert_eq!((e.status, e.message.as_ref()), (401, "JWT not present."));
        // key_or_jwt: a key alone is enough; nothing at all is not.
        let (p, shared, _) = setup_api("    auth: key_or_jwt\n", JWKS);
        bodiless(&p, &shared, &h).await.unwrap();
        let e = bodiless(&p, &shared, &headers(&[])).await.unwrap_err();
        assert_eq!((e.status, e.message.as_ref()), (401, "JWT not present."));
    }

    #[tokio::test]
    async fn a_stream_is_estimated_for_metrics_only_when_usage_is_read() {
        let h = headers(&[("api-key", "key-a")]);
        let body = br#"{"messages":[{"role":"user","content":"Hello there!"}]}"#;
        let (p, shared, _) = setup("      - emit_token_metric: {dimensions: [api]}\n");
        for stream in [false, true] {
            let mut ctx = RequestContext {
                stream,
                ..RequestContext::default()
            };
            p.inbound(&request(&h, Some(body)), &mut ctx, &shared)
                .await
                .unwrap();
            assert_eq!(ctx.estimate.is_some(), stream);
        }
        let (p, shared, _) = setup(
            "      - rate_limit: {calls: 5, renewal_period_seconds: 10, counter_key: subscription}\n",
        );
        let mut ctx = RequestContext {
            stream: true,
            ..RequestContext::default()
        };
        p.inbound(&request(&h, Some(body)), &mut ctx, &shared)
            .await
            .unwrap();
        assert!(ctx.estimate.is_none() && ctx.operation.is_none());
    }

    #[tokio::test]
    async fn answers_are_read_by_their_content_type() {
        let (p, shared, _) = setup("      - emit_token_metric: {dimensions: [api]}\n");
        // A streamed transcription: the request did not say `stream` in a
        // way the gateway reads, the answer is SSE with its usage at the end.
        let mut ctx = RequestContext::default();
        p.start_response(&mut ctx, 200, Some("text/event-stream"), None);
        p.response_chunk(
            &mut ctx,
            b"data: {\"type\":\"transcript.text.delta\",\"delta\":\"Hello\"}\n\ndata: {\"type\":\"transcript.text.done\",\"text\":\"Hello\",\"usage\":{\"input_tokens\":14,\"output_tokens\":2,\"total_tokens\":16}}\n\n",
        );
        p.finish(&mut ctx, &shared, None).await;
        assert_eq!(ctx.usage.map(|u| u.total_tokens), Some(16));
        // Speech, images and file contents are bytes: not read at all.
        for binary in [
            "audio/mpeg",
            "audio/wav",
            "image/png",
            "application/octet-stream",
            "video/mp4",
            "AUDIO/PCM",
        ] {
            let mut ctx = RequestContext::default();
            p.start_response(&mut ctx, 200, Some(binary), None);
            assert!(ctx.usage_scanner.is_none(), "{binary}");
        }
        // A stream flagged by the request, answered without a type, is SSE.
        let mut ctx = RequestContext {
            stream: true,
            ..RequestContext::default()
        };
        p.start_response(&mut ctx, 200, None, None);
        p.response_chunk(
            &mut ctx,
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\ndata: [DONE]\n\n",
        );
        p.finish(&mut ctx, &shared, None).await;
        assert_eq!(ctx.usage.map(|u| u.total_tokens), Some(7));
        // A flagged stream answered with JSON is read as JSON.
        let mut ctx = RequestContext {
            stream: true,
            ..RequestContext::default()
        };
        p.start_response(&mut ctx, 200, Some("application/json"), None);
        p.response_chunk(
            &mut ctx,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
        );
        p.finish(&mut ctx, &shared, None).await;
        assert_eq!(ctx.usage.map(|u| u.total_tokens), Some(2));
    }

    #[tokio::test]
    async fn usage_is_read_only_from_successful_answers_and_when_needed() {
        let (p, _, _) = setup("      - emit_token_metric: {dimensions: [api]}\n");
        let mut ctx = RequestContext::default();
        p.start_response(
            &mut ctx,
            429,
            Some("application/json"),
            Some("East US".into()),
        );
        assert!(ctx.usage_scanner.is_none());
        assert_eq!(ctx.upstream_status, 429);
        assert_eq!(ctx.backend_region.as_deref(), Some("East US"));
        p.start_response(&mut ctx, 200, Some("application/json"), None);
        assert!(ctx.usage_scanner.is_some());
        let (p, _, _) = setup(
            "      - rate_limit: {calls: 5, renewal_period_seconds: 10, counter_key: subscription}\n",
        );
        let mut ctx = RequestContext::default();
        p.start_response(&mut ctx, 200, Some("application/json"), None);
        assert!(ctx.usage_scanner.is_none());
    }

    #[test]
    fn only_a_backend_region_dimension_reads_the_region() {
        let reads = |policies: &str| setup(policies).0.reads_region();
        assert!(reads(
            "      - emit_token_metric: {dimensions: [api, backend_region]}\n"
        ));
        assert!(reads(
            "      - rate_limit: {calls: 5, renewal_period_seconds: 60, counter_key: subscription}\n      - emit_token_metric: {dimensions: [backend_region]}\n"
        ));
        assert!(!reads(
            "      - emit_token_metric: {dimensions: [subscription, api, deployment, backend]}\n"
        ));
        assert!(!reads(
            "      - rate_limit: {calls: 5, renewal_period_seconds: 60, counter_key: subscription}\n"
        ));
    }

    #[tokio::test]
    async fn token_metrics_carry_each_dimensions_value() {
        let (p, mut shared, _) =
            setup("      - emit_token_metric: {dimensions: [subscription, api, backend]}\n");
        let registry = prometheus::Registry::new();
        shared.metrics = Some(Arc::new(
            TokenMetrics::new(
                &registry,
                &[Dimension::Subscription, Dimension::Api, Dimension::Backend],
                10,
            )
            .unwrap(),
        ));
        let h = headers(&[("api-key", "key-a")]);
        let mut ctx = RequestContext::default();
        p.inbound(&request(&h, None), &mut ctx, &shared)
            .await
            .unwrap();
        p.start_response(&mut ctx, 200, Some("application/json"), None);
        p.response_chunk(
            &mut ctx,
            br#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
        );
        p.finish(&mut ctx, &shared, Some("eastus")).await;
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(
                r#"sluice_tokens_total{api="api",backend="eastus",subscription="team-a"} 7"#
            ),
            "{text}"
        );
    }
}
