//! Request traces on the data plane: the debug credential a request
//! carries (`Apim-Debug-Authorization`), what a traced request records at
//! each of pingora's hooks, the trace stored when the exchange ends, and
//! the one-line summary every request leaves.
//!
//! Untraced requests pay a header lookup when they arrive and one summary
//! in the ring when they end; everything else here runs only for a request
//! whose `ctx.trace` is set.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use sluice_policy::RequestContext;
use sluice_policy::error::GatewayError;
use sluice_routing::Outcome;
use sluice_trace::Section;
use sluice_trace::credentials::CredentialError;
use sluice_trace::record::{Recorder, Redactor, Tally, Val, body_excerpt};
use sluice_trace::store::{TraceLimits, TraceStore};
use sluice_trace::summary::{Summary, SummaryRing};

use crate::gateway::Gateway;

/// The request header that carries a debug credential.
pub const DEBUG_HEADER: &str = "apim-debug-authorization";
/// The response header naming a traced request's trace.
pub const TRACE_ID_HEADER: &str = "apim-trace-id";
const EXPIRED_HEADER: &str = "apim-debug-authorization-expired";
const WRONG_API_HEADER: &str = "apim-debug-authorization-wrongapi";

/// The traces of the gateway: the store `listTrace` reads, the summary
/// ring `GET /traces` reads, and how traces are written.
#[derive(Debug)]
pub struct Traces {
    pub store: TraceStore<Recorder>,
    pub ring: SummaryRing,
    pub redactor: Redactor,
    /// Bodies of traced requests are recorded up to this many bytes.
    pub body_bytes: usize,
    /// Debug credentials are accepted (a management listener exists).
    pub enabled: bool,
    /// The monotonic origin of the store's clock.
    origin: Instant,
    /// Each API's name, shared by its summaries.
    pub api_names: Vec<Arc<str>>,
    /// Each backend's name and region, shared by the summaries.
    pub backend_labels: Vec<(Arc<str>, Arc<str>)>,
    /// Traced requests (`sluice_traced_requests_total`).
    pub traced: prometheus::IntCounter,
}

impl Traces {
    pub fn new(
        cfg: &sluice_config::Config,
        registry: &prometheus::Registry,
    ) -> Result<Self, String> {
        let t = cfg
            .server
            .management
            .as_ref()
            .map(|m| m.tracing.clone())
            .unwrap_or_default();
        let enabled = cfg.server.management.is_some();
        let traced = prometheus::IntCounter::new(
            "sluice_traced_requests_total",
            "Requests traced because they carried a valid debug credential (Apim-Debug-Authorization).",
        )
        .map_err(|e| e.to_string())?;
        registry
            .register(Box::new(traced.clone()))
            .map_err(|e| e.to_string())?;
        let mut params: Vec<String> = cfg
            .apis
            .iter()
            .map(|a| a.subscription.query_name.clone())
            // A Realtime handshake from a browser carries its key in `api-key=`.
            .chain([sluice_policy::realtime::KEY_PARAM.to_string()])
            .collect();
        params.sort();
        params.dedup();
        let names = cfg
            .credential_headers()
            .into_iter()
            // A browser's Realtime key may ride in a subprotocol.
            .chain([http::header::SEC_WEBSOCKET_PROTOCOL])
            .chain(t.redact_headers.iter().cloned());
        Ok(Traces {
            store: TraceStore::new(TraceLimits {
                max_traces: t.max_traces,
                max_bytes: t.max_bytes,
                ttl: t.ttl,
                // A running request (a long stream) keeps its mark until it
                // ends; only a mark whose request never ended is swept.
                pending_ttl: t.ttl.max(Duration::from_secs(86_400)),
            }),
            ring: SummaryRing::new(if enabled { t.summaries } else { 0 }),
            redactor: Redactor::new(names, params),
            body_bytes: t.body_bytes,
            enabled,
            origin: Instant::now(),
            api_names: cfg
                .apis
                .iter()
                .map(|a| Arc::from(a.name.as_str()))
                .collect(),
            backend_labels: cfg
                .backends
                .iter()
                .map(|b| (Arc::from(b.name.as_str()), Arc::from(b.region.as_str())))
                .collect(),
            traced,
        })
    }

    /// The store's clock: monotonic time since the gateway started.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `yyyy-MM-ddTHH:mm:ssZ` for an expiry in seconds since the epoch.
fn expiry_text(exp: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(exp);
    let full = sluice_trace::format_timestamp(t);
    // Drop the fraction: `2026-12-01T10:00:00.0000000Z` -> `...:00Z`.
    match full.split_once('.') {
        Some((head, _)) => format!("{head}Z"),
        None => full,
    }
}

/// A text value for a trace.
fn owned(s: &str) -> Val {
    Val::from(s.to_string())
}

impl Gateway {
    /// A request for API `api` arrived: if it carries a debug credential,
    /// check it. A valid one for this API starts the trace; an expired one
    /// or one for another API leaves a note for the response headers, and
    /// the request is served untraced. Call before any policy runs.
    #[inline]
    pub(crate) fn begin_trace(&self, session: &Session, ctx: &mut RequestContext, api: usize) {
        // Checked where it is called: most gateways trace nothing.
        if self.state.traces.enabled {
            self.begin_enabled_trace(session, ctx, api);
        }
    }

    #[inline(never)]
    fn begin_enabled_trace(&self, session: &Session, ctx: &mut RequestContext, api: usize) {
        let traces = &self.state.traces;
        let Some(token) = session
            .req_header()
            .headers
            .get(DEBUG_HEADER)
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        let api_name = &self.state.api_names[api];
        match self
            .state
            .debug_key
            .check(token.trim(), api_name, unix_now())
        {
            Ok(_) => {}
            Err(CredentialError::Expired(exp)) => {
                ctx.trace_note = Some((
                    EXPIRED_HEADER,
                    format!(
                        "The debug credential expired at {}; request a new one with listDebugCredentials.",
                        expiry_text(exp)
                    ),
                ));
                return;
            }
            Err(CredentialError::WrongApi(other)) => {
                ctx.trace_note = Some((
                    WRONG_API_HEADER,
                    format!(
                        "The debug credential is for API '{other}', not for '{api_name}'; request one for this API."
                    ),
                ));
                return;
            }
            Err(CredentialError::Invalid) => {
                tracing::debug!("a request carried a debug credential this gateway did not issue");
                return;
            }
        }
        let id = sluice_trace::new_trace_id();
        if !traces.store.begin(&id, traces.now()) {
            tracing::debug!("trace store full of unfinished traces; request not traced");
            return;
        }
        traces.traced.inc();
        let mut rec = Box::new(Recorder::new(ctx.started));
        let req = session.req_header();
        let scheme = "http";
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        let url = format!(
            "{scheme}://{host}{}",
            traces.redactor.url(req.uri.path(), req.uri.query())
        );
        rec.add(
            Section::Inbound,
            "api-inspector",
            Val::obj([(
                "request",
                Val::obj([
                    ("method", owned(req.method.as_str())),
                    ("url", Val::from(url)),
                    (
                        "clientIp",
                        Val::from(
                            session
                                .client_addr()
                                .and_then(|a| a.as_inet())
                                .map(|a| a.ip().to_string()),
                        ),
                    ),
                    ("headers", traces.redactor.headers(&req.headers)),
                ]),
            )]),
        );
        let cfg = self.state.apis[api].config();
        let rest = req.uri.path().get(ctx.rest_offset..).unwrap_or("");
        rec.add(
            Section::Inbound,
            "api-inspector",
            Val::obj([(
                "configuration",
                Val::obj([
                    (
                        "api",
                        Val::obj([
                            ("name", owned(&cfg.name)),
                            ("from", owned(&cfg.path)),
                            ("auth", Val::from(format!("{:?}", cfg.auth).to_lowercase())),
                        ]),
                    ),
                    (
                        "operation",
                        Val::obj([
                            ("method", owned(req.method.as_str())),
                            ("uriTemplate", Val::from(uri_template(rest))),
                        ]),
                    ),
                    ("pool", Val::from(cfg.pool.clone())),
                    // Sluice has no users or products: subscriptions are
                    // allowed per API. Written as APIM writes "none".
                    ("user", Val::from("-")),
                    ("product", Val::from("-")),
                ]),
            )]),
        );
        ctx.trace = Some(rec);
        ctx.trace_id = Some(id.into_boxed_str());
    }

    /// The trace's response headers: `Apim-Trace-Id`, or the note on a
    /// credential that did not open tracing.
    #[inline]
    pub(crate) fn trace_headers(ctx: &RequestContext) -> Option<(&'static str, String)> {
        if let Some(id) = &ctx.trace_id {
            return Some((TRACE_ID_HEADER, id.to_string()));
        }
        ctx.trace_note.clone()
    }

    /// A gateway-made answer (refusal or error) to a traced request (or
    /// one whose credential did not open tracing): recorded in `on-error`,
    /// and carrying the trace's header. `None` for any other request, which
    /// gets `err` as it is.
    pub(crate) fn traced_answer(
        &self,
        ctx: &mut RequestContext,
        err: &GatewayError,
    ) -> Option<GatewayError> {
        let (name, value) = Self::trace_headers(ctx)?;
        // An answer that could not be written is offered again by
        // `fail_to_proxy`: it is recorded once.
        if let Some(t) = ctx.trace.as_mut()
            && !t.has(Section::OnError, "gateway")
        {
            t.add(
                Section::OnError,
                "gateway",
                Val::obj([
                    ("status", err.status.into()),
                    ("reason", Val::from(err.reason())),
                    ("message", Val::from(err.message.to_string())),
                    (
                        "headers",
                        Val::Headers(
                            err.headers
                                .iter()
                                .map(|(n, v)| (n.as_str().to_string(), v.clone()))
                                .collect(),
                        ),
                    ),
                ]),
            );
        }
        Some(err.clone().with_header(name, value))
    }

    /// The request as it goes to the backend (after every rewrite).
    #[inline]
    pub(crate) fn trace_forward(&self, ctx: &mut RequestContext, upstream: &RequestHeader) {
        // Checked where it is called: most requests are not traced.
        if ctx.trace.is_some() {
            self.trace_traced_forward(ctx, upstream);
        }
    }

    #[inline(never)]
    fn trace_traced_forward(&self, ctx: &mut RequestContext, upstream: &RequestHeader) {
        let Some(b) = ctx.backend.and_then(|i| self.state.backends.get(i)) else {
            return;
        };
        let traces = &self.state.traces;
        let url = format!(
            "{}://{}{}",
            if b.tls { "https" } else { "http" },
            b.host_header,
            traces
                .redactor
                .url(upstream.uri.path(), upstream.uri.query())
        );
        let data = Val::obj([
            (
                "message",
                Val::from(format!(
                    "Request is being forwarded to backend '{}'. Read timeout set to {} ms.",
                    b.name,
                    b.read_timeout.as_millis()
                )),
            ),
            (
                "request",
                Val::obj([
                    ("method", owned(upstream.method.as_str())),
                    ("url", Val::from(url)),
                    ("headers", traces.redactor.headers(&upstream.headers)),
                ]),
            ),
        ]);
        ctx.trace(Section::Backend, "request-forwarder", || data);
    }

    /// A backend's answer head (whether it goes to the client or the
    /// request fails over).
    #[inline]
    pub(crate) fn trace_backend_head(&self, ctx: &mut RequestContext, head: &ResponseHeader) {
        if ctx.trace.is_some() {
            self.trace_traced_backend_head(ctx, head);
        }
    }

    #[inline(never)]
    fn trace_traced_backend_head(&self, ctx: &mut RequestContext, head: &ResponseHeader) {
        let headers = self.state.traces.redactor.headers(&head.headers);
        let backend = ctx
            .backend
            .and_then(|i| self.state.backends.get(i))
            .map(|b| b.name.clone());
        let took = ctx.routing.attempts.last().map(|a| ms(a.started.elapsed()));
        ctx.trace(Section::Backend, "forward-request", || {
            Val::obj([
                ("backend", Val::from(backend)),
                ("durationMs", Val::from(took)),
                (
                    "response",
                    Val::obj([
                        (
                            "status",
                            Val::obj([
                                ("code", head.status.as_u16().into()),
                                (
                                    "reason",
                                    Val::from(head.status.canonical_reason().unwrap_or("")),
                                ),
                            ]),
                        ),
                        ("headers", headers),
                    ]),
                ),
            ])
        });
    }

    /// The answer head the client gets from a backend.
    pub(crate) fn trace_response(&self, ctx: &mut RequestContext, head: &ResponseHeader) {
        if ctx.trace.is_none() {
            return;
        }
        let headers = self.state.traces.redactor.headers(&head.headers);
        ctx.trace(Section::Outbound, "transfer-response", || {
            Val::obj([
                (
                    "message",
                    "The response head is being sent to the caller.".into(),
                ),
                ("status", head.status.as_u16().into()),
                ("headers", headers),
            ])
        });
        ctx.tally = Some(Box::new(Tally::new(self.state.traces.body_bytes)));
    }

    /// A request body read before routing, for a traced request.
    pub(crate) fn trace_request_body(&self, ctx: &mut RequestContext, body: &[u8]) {
        let keep = self.state.traces.body_bytes;
        ctx.trace(Section::Inbound, "request-payload-handler", || {
            payload_entry(
                format!(
                    "Reading request payload succeeded. {} bytes read.",
                    body.len()
                ),
                (keep > 0).then(|| body_excerpt(body, keep)),
            )
        });
    }

    /// A traced request's body that streamed to the backend has ended.
    pub(crate) fn trace_streamed_body(&self, ctx: &mut RequestContext, t: &Tally) {
        let keep = self.state.traces.body_bytes;
        ctx.trace(Section::Inbound, "request-payload-handler", || {
            payload_entry(
                format!(
                    "The request payload streamed to the backend: {} bytes.",
                    t.bytes
                ),
                (keep > 0).then(|| t.excerpt()),
            )
        });
    }

    /// The exchange is over: store a traced request's trace, and leave
    /// every request's summary in the ring.
    pub(crate) fn end_trace(&self, session: &Session, ctx: &mut RequestContext, status: u16) {
        let traces = &self.state.traces;
        if let Some(mut rec) = ctx.trace.take() {
            self.trace_attempts(ctx, &mut rec);
            let tally = ctx.tally.take();
            let end = Instant::now();
            let mut fields = vec![
                ("status", Val::from(status)),
                (
                    "durationMs",
                    Val::F64(ms(end.saturating_duration_since(ctx.started))),
                ),
            ];
            if let Some(t) = &tally {
                fields.push(("bytes", t.bytes.into()));
                let since = |at: Option<Instant>| {
                    Val::from(at.map(|f| ms(f.saturating_duration_since(ctx.started))))
                };
                fields.push(("timeToFirstByteMs", since(t.first)));
                if ctx.stream {
                    fields.push(("events", t.events.into()));
                    fields.push(("timeToFirstEventMs", since(t.first_event)));
                }
                if traces.body_bytes > 0 {
                    fields.push(("body", t.excerpt()));
                }
            }
            let message = match (status, &tally) {
                (0, _) => "The caller went away before the response was complete.",
                (_, Some(_)) => "Response has been sent to the caller in full.",
                (_, None) => "The gateway's own answer has been sent to the caller.",
            };
            fields.insert(0, ("message", Val::from(message)));
            rec.add_at(
                Section::Outbound,
                "transfer-response",
                end,
                Val::Obj(fields),
            );
            let id = ctx.trace_id.clone().unwrap_or_default();
            let bytes = rec.approx_bytes();
            traces.store.finish(&id, *rec, bytes, traces.now());
        }
        if traces.ring.capacity() == 0 {
            return;
        }
        let Some(api) = ctx.api else { return };
        let req = session.req_header();
        let labels = ctx.backend.and_then(|i| traces.backend_labels.get(i));
        // The region the backend reported (shared with the request, which
        // shares the backend's label when it is the same), else the label.
        let region = match &ctx.backend_region {
            Some(r) if r.len() <= MAX_LABEL => Some(r.clone()),
            Some(r) => Some(Arc::from(clip(r, MAX_LABEL))),
            None => labels.map(|l| l.1.clone()),
        };
        let deployment = ctx
            .deployment
            .as_deref()
            .or_else(|| {
                sluice_policy::route::deployment_of(
                    req.uri.path().get(ctx.rest_offset..).unwrap_or(""),
                )
            })
            .map(|d| Box::from(clip(d, MAX_LABEL)));
        let latency = ctx.started.elapsed();
        traces.ring.push(Summary {
            at: SystemTime::now()
                .checked_sub(latency)
                .unwrap_or_else(SystemTime::now),
            api: traces.api_names[api].clone(),
            method: req.method.clone(),
            path: Box::from(clip(req.uri.path(), MAX_PATH)),
            subscription: ctx.subscription.as_ref().map(|s| s.name.clone()),
            deployment,
            backend: labels.map(|l| l.0.clone()),
            region,
            status,
            prompt_tokens: ctx.usage.as_ref().map(|u| u.prompt_tokens),
            completion_tokens: ctx.usage.as_ref().map(|u| u.completion_tokens),
            total_tokens: ctx.usage.as_ref().map(|u| u.total_tokens),
            latency,
            stream: ctx.stream,
            attempts: u8::try_from(ctx.routing.attempts.len()).unwrap_or(u8::MAX),
            trace_id: ctx.trace_id.clone(),
        });
    }

    /// Each backend attempt: which backend, why, and how it ended
    /// (breaker trips and failovers included).
    fn trace_attempts(&self, ctx: &RequestContext, rec: &mut Recorder) {
        let pool = ctx
            .routing
            .pool
            .and_then(|p| self.state.selector.pool_name(p))
            .map(str::to_string);
        for (n, a) in ctx.routing.attempts.iter().enumerate() {
            let Some(b) = self.state.backends.get(a.backend) else {
                continue;
            };
            let why = if a.stale_retry {
                "the pooled connection had gone stale; the same backend is tried again"
            } else if a.probe {
                "its circuit breaker is half-open: this request is the probe"
            } else if a.steered {
                "a backend ahead of it had too little headroom for the request"
            } else if n == 0 {
                "first choice of the pool"
            } else {
                "next choice after a failover"
            };
            rec.add_at(
                Section::Backend,
                "set-backend-service",
                a.started,
                Val::obj([
                    (
                        "message",
                        Val::from(format!(
                            "Backend was changed to backend with ID '{}' (region '{}'): {why}.",
                            b.name, b.region
                        )),
                    ),
                    ("attempt", (n + 1).into()),
                    ("pool", Val::from(pool.clone())),
                    ("backend", owned(&b.name)),
                    ("region", owned(&b.region)),
                ]),
            );
            let end = a.started + a.duration;
            let outcome = a.outcome.as_ref().map(|o| o.label().into_owned());
            if a.outcome.is_some() && !matches!(a.outcome, Some(Outcome::Status { .. })) {
                rec.add_at(
                    Section::Backend,
                    "forward-request",
                    end,
                    Val::obj([
                        ("backend", owned(&b.name)),
                        ("error", Val::from(outcome.clone())),
                        ("durationMs", Val::F64(ms(a.duration))),
                    ]),
                );
            }
            if let Some(trip) = &a.tripped {
                rec.add_at(
                    Section::Backend,
                    "circuit-breaker",
                    end,
                    Val::obj([
                        (
                            "message",
                            Val::from(format!(
                                "The circuit breaker of backend '{}' tripped.",
                                b.name
                            )),
                        ),
                        ("rule", Val::from(trip.rule.clone())),
                        ("outcome", Val::from(trip.outcome.clone())),
                        (
                            "retryAfterSeconds",
                            Val::from(trip.retry_after.map(|d| d.as_secs_f64())),
                        ),
                    ]),
                );
            }
            if a.failed_over {
                rec.add_at(
                    Section::Backend,
                    "failover",
                    end,
                    Val::obj([
                        (
                            "message",
                            Val::from(format!(
                                "Backend '{}' failed ({}); the request goes to the next backend.",
                                b.name,
                                outcome.as_deref().unwrap_or("no outcome")
                            )),
                        ),
                        ("durationMs", Val::F64(ms(a.duration))),
                    ]),
                );
            }
        }
    }
}

/// A `request-payload-handler` entry: the message alone, or with the body
/// when bodies are recorded.
fn payload_entry(message: String, body: Option<Val>) -> Val {
    match body {
        None => Val::from(message),
        Some(b) => Val::obj([("message", Val::from(message)), ("body", b)]),
    }
}

/// The most of a request's path a summary keeps (a request head may be
/// up to 1 MiB long; the ring must stay small).
const MAX_PATH: usize = 256;
/// The most of a client-given name (deployment, region) a summary keeps.
const MAX_LABEL: usize = 128;

/// `s` cut to at most `max` bytes, on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// The operation's URI template, as APIM names it: the deployment segment
/// replaced by `{deployment-id}`.
fn uri_template(rest: &str) -> String {
    match rest.strip_prefix("/deployments/") {
        Some(tail) => match tail.split_once('/') {
            Some((_, op)) => format!("/deployments/{{deployment-id}}/{op}"),
            None => "/deployments/{deployment-id}".to_string(),
        },
        None => rest.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_name_the_deployment_segment() {
        assert_eq!(
            uri_template("/deployments/gpt-4o/chat/completions"),
            "/deployments/{deployment-id}/chat/completions"
        );
        assert_eq!(
            uri_template("/deployments/x"),
            "/deployments/{deployment-id}"
        );
        assert_eq!(uri_template("/v1/responses"), "/v1/responses");
    }

    #[test]
    fn long_names_are_clipped_on_a_character_boundary() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc");
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip(&"x".repeat(2000), MAX_PATH).len(), MAX_PATH);
    }

    #[test]
    fn expiry_is_whole_seconds() {
        assert_eq!(expiry_text(0), "1970-01-01T00:00:00Z");
    }
}
