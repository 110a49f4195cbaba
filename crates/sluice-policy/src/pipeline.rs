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

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName};
use sluice_auth::{Fetch, JwtError, JwtSettings, JwtValidator, KeysSource};
use sluice_config::{
    Api, ApiAuth, CallLimit, CounterKey, Dimension, JwtKeys, Policy, QuotaPeriod, TokenLimit,
};
use sluice_limits::{
    CounterStore, Limit, Period, Window, call_quota_message, rate_limit_message, retry_after_secs,
    token_limit_message, token_quota_message,
};
use sluice_tokens::{Operation, UsageScanner, encoding_for_model, estimate_request};

use crate::context::{RequestContext, TokenCharge};
use crate::error::GatewayError;
use crate::metrics::TokenMetrics;
use crate::subscription::{SubscriptionIndex, extract_key};

/// What every API's pipeline shares.
#[derive(Debug, Clone)]
pub struct Shared {
    pub subscriptions: Arc<SubscriptionIndex>,
    pub store: Arc<dyn CounterStore>,
    pub metrics: Option<Arc<TokenMetrics>>,
}

/// The parts of a request the inbound steps look at.
#[derive(Debug, Clone, Copy)]
pub struct InboundRequest<'a> {
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    pub client_ip: Option<IpAddr>,
    /// Path after the API prefix (`/deployments/{d}/chat/completions`).
    pub rest_path: &'a str,
    /// The whole body when it was read before routing (≤ 64 KiB).
    pub body: Option<&'a [u8]>,
    /// The request's `Host`, for the API URL APIM echoes in `WWW-Authenticate`.
    pub host: &'a str,
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
                    let validator = Arc::new(JwtValidator::new(
                        JwtSettings {
                            keys_source: match &v.keys {
                                JwtKeys::OpenIdConfiguration(u) => {
                                    KeysSource::OpenIdConfiguration(u.clone())
                                }
                                JwtKeys::Jwks(u) => KeysSource::Jwks(u.clone()),
                            },
                            issuers: v.issuers.clone(),
                            audiences: v.audiences.clone(),
                            client_application_ids: v.client_application_ids.clone(),
                            required_roles: v.required_roles.clone(),
                            clock_skew: v.clock_skew,
                            refetch_min_interval: Duration::from_secs(30),
                        },
                        fetch.clone(),
                    ));
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
        ApiPipeline {
            api_name: Arc::from(api.name.as_str()),
            api: api.clone(),
            steps,
            jwt,
            needs_usage,
        }
    }

    /// Whether the response's usage is read (token_limit, emit_token_metric).
    pub fn needs_usage(&self) -> bool {
        self.needs_usage
    }

    /// The JWT validator, if any (the proxy warms its key cache at start).
    pub fn jwt_validator(&self) -> Option<&Arc<JwtValidator>> {
        self.jwt.as_ref()
    }

    /// Authentication, then every policy in order. `Err` is the answer to
    /// send instead of forwarding.
    pub async fn inbound(
        &self,
        req: &InboundRequest<'_>,
        ctx: &mut RequestContext,
        shared: &Shared,
    ) -> Result<(), GatewayError> {
        ctx.client_ip = req.client_ip;
        self.authenticate(req, ctx, shared)?;
        if self.needs_usage {
            let op = Operation::from_path(req.rest_path);
            let deployment = crate::route::deployment_of(req.rest_path);
            ctx.operation = Some(op);
            ctx.deployment = deployment.map(str::to_string);
            if let Some(body) = req.body {
                let e = estimate_request(op, deployment, body);
                if ctx.deployment.is_none() {
                    ctx.deployment = e.model.clone();
                }
                ctx.estimate = Some(e);
            }
        }
        let key_or_jwt_with_key = self.api.auth == ApiAuth::KeyOrJwt && ctx.subscription.is_some();
        for (i, step) in self.steps.iter().enumerate() {
            match step {
                Step::Jwt(v) => {
                    if key_or_jwt_with_key {
                        continue;
                    }
                    let auth = req
                        .headers
                        .get(http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok());
                    match v.validate(auth).await {
                        Ok(caller) => ctx.caller = Some(caller),
                        Err(e) => return Err(jwt_error(&e)),
                    }
                }
                Step::Calls { limit, key, quota } => {
                    let k = counter_key(key, req, ctx, if *quota { "quota" } else { "calls" });
                    if let Err(ex) = shared.store.reserve(&k, limit, 1).await {
                        let secs = retry_after_secs(ex.retry_after).to_string();
                        return Err(if *quota {
                            GatewayError::new(403, call_quota_message(ex.retry_after))
                                .with_header("retry-after", secs)
                        } else {
                            GatewayError::new(429, rate_limit_message(ex.retry_after))
                                .with_header("retry-after", secs)
                        });
                    }
                }
                Step::Tokens(t) => {
                    self.token_step(i, t, req, ctx, shared).await?;
                }
                Step::Metric(_) => {}
            }
        }
        Ok(())
    }

    fn authenticate(
        &self,
        req: &InboundRequest<'_>,
        ctx: &mut RequestContext,
        shared: &Shared,
    ) -> Result<(), GatewayError> {
        let realm = || format!("http://{}{}", req.host, self.api.path);
        let settings = &self.api.subscription;
        let check = |ctx: &mut RequestContext| -> Result<(), GatewayError> {
            match shared
                .subscriptions
                .check(&self.api.name, settings, req.headers, req.query)
            {
                Ok(sub) => {
                    ctx.subscription = sub;
                    Ok(())
                }
                Err(e) => Err(e.response(&realm(), settings)),
            }
        };
        match self.api.auth {
            ApiAuth::Key => check(ctx),
            ApiAuth::Jwt => Ok(()),
            ApiAuth::KeyOrJwt => {
                if extract_key(settings, req.headers, req.query).is_some() {
                    check(ctx)
                } else {
                    Ok(())
                }
            }
        }
    }

    async fn token_step(
        &self,
        step: usize,
        t: &TokenStep,
        req: &InboundRequest<'_>,
        ctx: &mut RequestContext,
        shared: &Shared,
    ) -> Result<(), GatewayError> {
        let (cfg, tpm, quota) = (&t.cfg, t.tpm.as_ref(), t.quota.as_ref());
        let key = counter_key(&cfg.counter_key, req, ctx, "tokens");
        // Streams are always estimated, as APIM does; otherwise only when asked.
        let amount = match &ctx.estimate {
            Some(e) if cfg.estimate_prompt_tokens || e.stream => u64::from(e.prompt_tokens),
            _ => 0,
        };
        let mut charge = TokenCharge {
            step,
            estimated: amount,
            tpm: None,
            quota: None,
        };
        if let Some(limit) = tpm {
            match shared.store.reserve(&key, limit, amount).await {
                Ok(r) => charge.tpm = Some(r),
                Err(ex) => {
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
                Ok(r) => charge.quota = Some(r),
                Err(ex) => {
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
            ctx.response_headers.push((h.clone(), amount.to_string()));
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
        region: Option<&str>,
    ) {
        ctx.upstream_status = status;
        ctx.backend_region = region.map(str::to_string);
        if !self.needs_usage || !(200..300).contains(&status) {
            return;
        }
        let sse = content_type.is_some_and(|c| c.starts_with("text/event-stream"));
        let model = ctx
            .deployment
            .as_deref()
            .or_else(|| ctx.estimate.as_ref().and_then(|e| e.model.as_deref()))
            .unwrap_or("");
        let prompt = ctx.estimate.as_ref().map(|e| e.prompt_tokens).unwrap_or(0);
        ctx.usage_scanner = Some(UsageScanner::new(sse, encoding_for_model(model), prompt));
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
        let usage = ctx.usage_scanner.as_mut().and_then(UsageScanner::finish);
        ctx.usage = usage.map(|(u, _)| u);
        let answered_ok = (200..300).contains(&ctx.upstream_status);
        for charge in std::mem::take(&mut ctx.token_charges) {
            // Reported/counted tokens; a failed or refused call consumed
            // none; a success whose usage is unknown keeps the estimate.
            let actual = match (&ctx.usage, answered_ok) {
                (Some(u), _) => u.total_tokens,
                (None, true) => charge.estimated,
                (None, false) => 0,
            };
            if let Some(r) = &charge.tpm {
                shared.store.reconcile(r, actual).await;
            }
            if let Some(r) = &charge.quota {
                shared.store.reconcile(r, actual).await;
            }
        }
        let (Some(metrics), Some(u)) = (&shared.metrics, &ctx.usage) else {
            return;
        };
        for step in &self.steps {
            let Step::Metric(dims) = step else { continue };
            metrics.record(
                |d| {
                    dims.contains(d)
                        .then(|| self.dimension_value(d, ctx, backend))
                },
                u.prompt_tokens,
                u.completion_tokens,
                u.total_tokens,
            );
        }
    }

    fn dimension_value(
        &self,
        d: &Dimension,
        ctx: &RequestContext,
        backend: Option<&str>,
    ) -> String {
        const NA: &str = "N/A";
        let or_na = |v: Option<&str>| v.unwrap_or(NA).to_string();
        match d {
            Dimension::Subscription => or_na(ctx.subscription.as_ref().map(|s| &*s.name)),
            Dimension::Api => self.api_name.to_string(),
            Dimension::Deployment => or_na(ctx.deployment.as_deref()),
            Dimension::Backend => or_na(backend),
            Dimension::BackendRegion => or_na(ctx.backend_region.as_deref()),
            Dimension::ClientIp => ctx
                .client_ip
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| NA.to_string()),
            Dimension::Identity => or_na(ctx.identity().as_deref()),
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

/// The counter a request is charged to. Keys are namespaced by what they
/// are (`sub:`, `ip:`, `hdr:`, `claim:`, `id:`) so values of different kinds
/// never share a counter; `kind` separates call and token counters.
fn counter_key(
    key: &CounterKey,
    req: &InboundRequest<'_>,
    ctx: &RequestContext,
    kind: &str,
) -> String {
    match key {
        CounterKey::Subscription => format!(
            "{kind}|sub:{}",
            ctx.subscription.as_ref().map(|s| &*s.name).unwrap_or("")
        ),
        CounterKey::Identity => format!("{kind}|id:{}", ctx.identity().unwrap_or_default()),
        CounterKey::ClientIp => format!(
            "{kind}|ip:{}",
            req.client_ip.map(|i| i.to_string()).unwrap_or_default()
        ),
        CounterKey::Header(h) => format!(
            "{kind}|hdr:{}:{}",
            h.as_str(),
            req.headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        ),
        CounterKey::Claim(c) => format!(
            "{kind}|claim:{c}:{}",
            ctx.caller
                .as_ref()
                .and_then(|caller| caller.claim_str(c))
                .unwrap_or_default()
        ),
    }
}
