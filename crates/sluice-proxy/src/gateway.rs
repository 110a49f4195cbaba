//! The `ProxyHttp` implementation: pingora's hooks, each delegating the
//! decision to `sluice-policy`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType};
use sluice_policy::body_edit::{BodyEdit, BodyPlan, BodyTop, api_version_takes_stream_options};
use sluice_policy::context::BodyMode;
use sluice_policy::error::GatewayError;
use sluice_policy::route::{keeps_path, strip_query_param, upstream_path};
use sluice_policy::{After, InboundRequest, RequestContext, stream_tag};
use sluice_routing::Outcome;

use crate::state::GatewayState;

/// Bodies up to this size are read before routing and can be replayed on a
/// retry; it is pingora's fixed retry-buffer size.
pub const PREREAD_LIMIT: u64 = 64 * 1024;

/// The most of a streamed multipart body read before routing to find its
/// `model` field; a field after that (after a large file) is not looked for.
/// Header names the gateway looks up on every request, built once.
static X_MS_REGION: http::HeaderName = http::HeaderName::from_static("x-ms-region");
static X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
static X_MS_STREAM: http::HeaderName = http::HeaderName::from_static("x-ms-stream");
static API_KEY: http::HeaderName = http::HeaderName::from_static("api-key");

const FORM_PREFIX_LIMIT: usize = 64 * 1024;

/// The largest streamed request body copied to estimate its prompt (token
/// limits and metrics); a larger one is charged only what the backend reports.
const STREAMED_ESTIMATE_LIMIT: usize = 1024 * 1024;

/// APIM's health-probe path, answered by the gateway itself.
const STATUS_PATH: &str = "/status-0123456789abcdef";

/// The gateway: pingora calls its hooks for every request.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub(crate) state: Arc<GatewayState>,
}

impl Gateway {
    pub fn new(state: Arc<GatewayState>) -> Self {
        Gateway { state }
    }
}

/// The most request body the gateway reads and discards after an early
/// answer (401, 404, 413, 429) so that closing the connection does not cut
/// the client off before it has read the answer; larger bodies are not read.
const DISCARD_LIMIT: usize = 8 * 1024 * 1024;

/// How long discarding an unread request body may take.
const DISCARD_TIME: Duration = Duration::from_secs(2);

fn expects_continue(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(is_continue)
}

/// An `Expect` value asking for `100 Continue`.
fn is_continue(expect: &http::HeaderValue) -> bool {
    expect.as_bytes().eq_ignore_ascii_case(b"100-continue")
}

/// Read and drop what is left of the request body, up to [`DISCARD_LIMIT`]
/// bytes and [`DISCARD_TIME`].
async fn discard_body(session: &mut Session) {
    let mut seen = 0usize;
    let deadline = tokio::time::Instant::now() + DISCARD_TIME;
    while let Ok(Ok(Some(chunk))) =
        tokio::time::timeout_at(deadline, session.read_request_body()).await
    {
        seen += chunk.len();
        if seen > DISCARD_LIMIT {
            return;
        }
    }
}

/// Write a gateway-made response (APIM's JSON error body) and end it.
///
/// The answer goes out first, whatever is left of the request body is read
/// afterwards: a refused caller never makes the gateway wait for its upload.
/// When some of the body is still unread, the answer says
/// `Connection: close`; up to [`DISCARD_LIMIT`] bytes of the body are then
/// read and dropped (for at most [`DISCARD_TIME`]) so that closing does not
/// reset the connection before the client has read the answer, and the
/// connection is closed. A body declared larger than that, or chunked, is
/// not read at all, nor is one the client holds back waiting for
/// `100 Continue` (`continued` false). A request whose body was read (or
/// that has none) keeps its connection.
pub(crate) fn respond<'a>(
    session: &'a mut Session,
    err: &'a GatewayError,
    continued: bool,
) -> Answer<'a> {
    Box::pin(respond_now(session, err, continued))
}

/// A gateway-made answer on its way out: boxed, so that the hooks' futures
/// hold a pointer where they would hold its whole state, and its code is not
/// inlined into the hooks' hot paths (it runs only for refusals and errors).
pub(crate) type Answer<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>>;

/// The answer to APIM's status path: `200` with no body.
fn answer_status(session: &mut Session) -> Answer<'_> {
    Box::pin(async move {
        let mut resp = ResponseHeader::build(200, Some(1))?;
        resp.insert_header("content-length", "0")?;
        session.write_response_header(Box::new(resp), true).await
    })
}

async fn respond_now(session: &mut Session, err: &GatewayError, continued: bool) -> Result<()> {
    let body = err.body();
    let mut resp = ResponseHeader::build(err.status, Some(4 + err.headers.len()))?;
    resp.set_reason_phrase(Some(err.reason()))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    for (k, v) in &err.headers {
        resp.insert_header(k.clone(), v.as_str())?;
    }
    let body_pending = !session.is_body_done();
    if body_pending {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await?;
    // The answer is on the wire before anything else is read.
    session.as_mut().finish_body().await?;
    let waits_for_continue = expects_continue(session) && !continued;
    let bounded = content_length(session).is_some_and(|n| n <= DISCARD_LIMIT as u64);
    if body_pending && bounded && !waits_for_continue {
        discard_body(session).await;
    }
    Ok(())
}

/// The hot generation calls: chat, completions, embeddings. Their path
/// names no backend-owned object, and only a chat completion's body can
/// create one (when it asks to be stored).
fn is_hot(op: sluice_tokens::Operation) -> bool {
    matches!(
        op,
        sluice_tokens::Operation::ChatCompletions
            | sluice_tokens::Operation::Completions
            | sluice_tokens::Operation::Embeddings
    )
}

/// A chat completion whose body asks to be stored creates an object its
/// backend owns: note it, so that the answer's id is learned. `top` was
/// read from `body`.
fn note_stored_chat(ctx: &mut RequestContext, body: &[u8], top: &BodyTop) {
    if top.store_flag(body) {
        ctx.owned = Some(Box::new(sluice_policy::affinity::OwnedCall {
            creates: true,
            ..Default::default()
        }));
    }
}

/// A passed body ([`BodyMode::Passed`]) going by in the body filter: once
/// its end has been read, its `stream` flag (and whether a chat completion
/// asks to be stored) is read from it. The usual body comes in one chunk,
/// which is the whole body; one that came in several is taken from
/// pingora's retry buffer, which holds all of it (at most 64 KiB). A
/// failover's replay of that buffer brings nothing new and is not looked at
/// again.
fn passed_body(session: &Session, chunk: Option<&Bytes>, end: bool, ctx: &mut RequestContext) {
    let read = session.as_ref().body_bytes_read() as u64;
    ctx.body_len = read;
    if !end || ctx.passed_seen {
        return;
    }
    ctx.passed_seen = true;
    // Borrowed: a clone of the chunk would allocate (a `Bytes` made from a
    // `Vec` is promoted to a shared one on its first clone).
    let buffered;
    let b: &[u8] = match chunk {
        Some(c) if c.len() as u64 == read => c,
        _ => match session.as_ref().get_retry_buffer() {
            Some(whole) => {
                buffered = whole;
                &buffered
            }
            None => return,
        },
    };
    let top = BodyTop::read(b);
    ctx.stream = top.stream_flag(b);
    if ctx.passed_chat {
        note_stored_chat(ctx, b, &top);
    }
}

/// The request headers the body step reads, found in one walk over the
/// head instead of a hashed lookup per name (a request carries few
/// headers; the walk compares each name once). Each is read from the first
/// value of its name, as `HeaderMap::get` gives it.
#[derive(Debug, Default, PartialEq)]
struct HeadFacts {
    /// `Content-Length`, when well formed.
    content_length: Option<u64>,
    /// A `Transfer-Encoding` is present.
    transfer_encoding: bool,
    /// It names `chunked` (in any case).
    chunked: bool,
    /// What `Content-Type` says, when it is text.
    content_type: Option<ContentType>,
    /// `Expect: 100-continue`.
    expect_continue: bool,
    /// An `Upgrade` is present (pingora's `is_upgrade_req` decides the rest).
    upgrade: bool,
}

/// A request body's `Content-Type`, as the body step sorts it.
#[derive(Debug, PartialEq)]
enum ContentType {
    /// It says `json` anywhere.
    Json,
    /// A multipart form, with its boundary.
    Multipart(String),
    /// Anything else (a `multipart/` type without a boundary included).
    Other,
}

impl HeadFacts {
    fn read(headers: &http::HeaderMap) -> Self {
        use http::header::{CONTENT_LENGTH, CONTENT_TYPE, EXPECT, TRANSFER_ENCODING, UPGRADE};
        let mut f = HeadFacts::default();
        let mut previous = None;
        for (name, value) in headers {
            // The map yields a name's first value first and its other
            // values right after it, with the same name (the one entry's):
            // only the first is read.
            if previous
                .replace(name)
                .is_some_and(|p: &http::HeaderName| std::ptr::eq(p, name))
            {
                continue;
            }
            // The five names have five lengths: a name is compared with
            // the one of its length at most (the lengths fold to constants).
            let len = name.as_str().len();
            if len == CONTENT_LENGTH.as_str().len() && name == CONTENT_LENGTH {
                f.content_length = parse_length(value.as_bytes());
            } else if len == TRANSFER_ENCODING.as_str().len() && name == TRANSFER_ENCODING {
                f.transfer_encoding = true;
                f.chunked = value.to_str().is_ok_and(|v| {
                    v.as_bytes()
                        .windows(7)
                        .any(|w| w.eq_ignore_ascii_case(b"chunked"))
                });
            } else if len == CONTENT_TYPE.as_str().len() && name == CONTENT_TYPE {
                f.content_type = value.to_str().ok().map(|c| {
                    if is_multipart(c) {
                        match sluice_tokens::multipart::boundary(c) {
                            Some(b) => ContentType::Multipart(b.to_string()),
                            None => ContentType::Other,
                        }
                    } else if mentions_json(c.as_bytes()) {
                        ContentType::Json
                    } else {
                        ContentType::Other
                    }
                });
            } else if len == EXPECT.as_str().len() && name == EXPECT {
                f.expect_continue = is_continue(value);
            } else if len == UPGRADE.as_str().len() && name == UPGRADE {
                f.upgrade = true;
            }
        }
        f
    }
}

/// A `Content-Type` of the `multipart/` family (only those can have a
/// form's boundary): a look at the first bytes, before any parsing.
fn is_multipart(content_type: &str) -> bool {
    content_type
        .trim_start()
        .as_bytes()
        .get(..10)
        .is_some_and(|t| t.eq_ignore_ascii_case(b"multipart/"))
}

/// A `Content-Type` that says `json` anywhere (`application/json`,
/// `application/merge-patch+json; charset=utf-8`), in any case.
fn mentions_json(content_type: &[u8]) -> bool {
    memchr::memchr2_iter(b'j', b'J', content_type).any(|i| {
        content_type
            .get(i..i + 4)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"json"))
    })
}

/// The request's declared `Content-Length`, if any and well formed.
fn content_length(session: &Session) -> Option<u64> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| parse_length(v.as_bytes()))
}

/// A `Content-Length` value: digits (the usual case, read directly), else
/// whatever `u64`'s parser takes of the trimmed text.
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if !v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit) {
        return Some(v.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')));
    }
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// Whether the final (non-1xx) response head has gone to the client; after
/// that nothing can be retried or replaced. A `100 Continue` does not count.
fn final_response_written(session: &Session) -> bool {
    session
        .response_written()
        .is_some_and(|r| !r.status.is_informational())
}

/// The response headers routing reads (retry hints and rate-limit
/// headroom), found in one walk over a response head instead of a hashed
/// lookup per name: most heads carry none of the retry hints, and the walk
/// looks at little more than each name's length and first byte.
pub(crate) struct RoutingHeaders<'h> {
    values: [Option<&'h str>; ROUTING_HEADERS.len()],
}

/// The names [`RoutingHeaders`] keeps, lowercase as `HeaderMap` holds them.
const ROUTING_HEADERS: [&str; 6] = [
    "retry-after-ms",
    "retry-after",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-reset-requests",
];

impl<'h> RoutingHeaders<'h> {
    pub(crate) fn read(headers: &'h http::HeaderMap) -> Self {
        let mut values = [None; ROUTING_HEADERS.len()];
        for (name, value) in headers {
            let name = name.as_str();
            // Every kept name starts `retry-after` or `x-ratelimit-`.
            if name.len() < 11 || !matches!(name.as_bytes()[0], b'r' | b'x') {
                continue;
            }
            if let Some(i) = ROUTING_HEADERS.iter().position(|n| *n == name)
                && values[i].is_none()
            {
                // As `HeaderMap::get`: the first value of the name.
                values[i] = Some(value.to_str().ok());
            }
        }
        Self {
            values: values.map(Option::flatten),
        }
    }

    /// The value of `name` (lowercase), if the head carried it as text.
    pub(crate) fn get(&self, name: &str) -> Option<&'h str> {
        let i = ROUTING_HEADERS.iter().position(|n| *n == name)?;
        self.values[i]
    }
}

/// Whether the request can still be sent to another backend: nothing has
/// reached the client, and the body is held whole (pingora's retry buffer or
/// the gateway's copy) or none of it has been read yet.
fn replayable_now(session: &Session, ctx: &RequestContext) -> bool {
    if final_response_written(session) {
        return false;
    }
    match ctx.body_mode {
        BodyMode::Streamed => {
            // Nothing went to a backend yet: at most the multipart prefix
            // read before routing, which is sent again.
            let prefix = ctx.body_prefix.as_ref().map_or(0, |p| p.len());
            ctx.body_len == 0 && session.as_ref().body_bytes_read() == prefix
        }
        BodyMode::Preread | BodyMode::Passed => !session.as_ref().retry_buffer_truncated(),
        BodyMode::Held | BodyMode::None => true,
    }
}

/// How an attempt that failed without a response head ended, for the
/// breaker: a timeout, or a lost connection.
pub(crate) fn outcome_of(e: &Error) -> Outcome {
    match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout | ErrorType::ReadTimedout => {
            Outcome::Timeout
        }
        ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError
        | ErrorType::TLSHandshakeFailure => Outcome::ConnectFailed,
        _ => Outcome::ConnectionLost,
    }
}

/// How an attempt that could not connect ended, for the breaker: a timeout,
/// or a connection failure (refused, no route, TLS, any other error).
pub(crate) fn connect_outcome(e: &Error) -> Outcome {
    match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout => Outcome::Timeout,
        _ => Outcome::ConnectFailed,
    }
}

/// Mark `e` for retry (or not) as the routing decided; a refusal becomes
/// the gateway's answer.
fn retry_as_decided(e: &mut Error, after: After, ctx: &mut RequestContext) {
    match after {
        After::Retry => e.set_retry(true),
        After::Refuse(refusal) => {
            ctx.refusal = Some(Box::new(refusal));
            e.set_retry(false);
        }
        After::Deliver => e.set_retry(false),
    }
}

/// A pingora error carrying a gateway-made status (413 while streaming).
fn status_error(status: u16, why: &'static str) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(status), why)
}

/// The parts of the request the policies look at.
fn inbound_request<'a>(
    req: &'a RequestHeader,
    client_ip: Option<std::net::IpAddr>,
    rest_offset: usize,
    body: Option<&'a [u8]>,
) -> InboundRequest<'a> {
    InboundRequest {
        headers: &req.headers,
        query: req.uri.query(),
        client_ip,
        rest_path: req.uri.path().get(rest_offset..).unwrap_or(""),
        body,
    }
}

/// One `X-Forwarded-For` hop: an address, or an address with a port as some
/// proxies write it (`203.0.113.7:41234`, `[2001:db8::1]:443`, `[2001:db8::1]`).
fn parse_hop(hop: &str) -> Option<std::net::IpAddr> {
    let hop = hop.trim();
    hop.parse::<std::net::IpAddr>()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse().ok())
        })
}

thread_local! {
    /// The last client address this worker thread wrote as a hop, and the
    /// header value made of it: a connection's requests (and a proxy's in
    /// front) come from one address, formatted once.
    static LAST_HOP: std::cell::RefCell<Option<(std::net::IpAddr, http::HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// `ip` as an `X-Forwarded-For` value (shared with earlier requests from
/// the same address on this thread).
fn hop_value(ip: std::net::IpAddr) -> http::HeaderValue {
    LAST_HOP.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((seen, value)) = last.as_ref()
            && *seen == ip
        {
            return value.clone();
        }
        let value = http::HeaderValue::from_maybe_shared(Bytes::from(ip.to_string()))
            .unwrap_or_else(|_| http::HeaderValue::from_static(""));
        *last = Some((ip, value.clone()));
        value
    })
}

/// A header value the gateway made (a count, an id): checked as pingora's
/// `insert_header` checks it.
fn header_value(value: String) -> Result<http::HeaderValue> {
    http::HeaderValue::try_from(value)
        .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "invalid header value", e))
}

/// A header value that `Debug` (and so pingora's logs) prints as
/// `Sensitive`: for the credentials the gateway injects.
fn sensitive(value: &str) -> Result<http::HeaderValue> {
    let mut v = http::HeaderValue::from_str(value)
        .map_err(|e| Error::because(ErrorType::InternalError, "invalid credential value", e))?;
    v.set_sensitive(true);
    Ok(v)
}

impl Gateway {
    /// Answer with a gateway-made response, which a traced request records
    /// (`on-error`) and which carries the trace's header.
    pub(crate) fn refuse<'a>(
        &'a self,
        session: &'a mut Session,
        ctx: &'a mut RequestContext,
        err: &'a GatewayError,
        continued: bool,
    ) -> Answer<'a> {
        Box::pin(async move {
            match self.traced_answer(ctx, err) {
                Some(traced) => respond_now(session, &traced, continued).await,
                None => respond_now(session, err, continued).await,
            }
        })
    }

    /// The client's address: the TCP peer, or, when the peer is a trusted
    /// proxy (`server.trusted_proxies`), the right-most `X-Forwarded-For`
    /// address that is not itself a trusted proxy.
    fn client_ip(&self, session: &Session) -> Option<std::net::IpAddr> {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_canonical())?;
        let trusted = &self.state.trusted_proxies;
        if trusted.is_empty() || !trusted.iter().any(|n| n.contains(&peer)) {
            return Some(peer);
        }
        let mut client = peer;
        for v in session
            .req_header()
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .rev()
        {
            let Ok(v) = v.to_str() else {
                return Some(client);
            };
            for hop in v.rsplit(',') {
                match parse_hop(hop) {
                    Some(ip) => {
                        let ip = ip.to_canonical();
                        client = ip;
                        if !trusted.iter().any(|n| n.contains(&ip)) {
                            return Some(client);
                        }
                    }
                    None => return Some(client),
                }
            }
        }
        Some(client)
    }

    /// Map a proxy failure to the gateway error the client sees.
    pub(crate) fn error_for(&self, e: &Error, ctx: &RequestContext) -> Option<GatewayError> {
        if let Some(refusal) = &ctx.refusal {
            return Some((**refusal).clone());
        }
        let backend = ctx
            .backend
            .and_then(|i| self.state.backends.get(i))
            .map(|b| b.name.as_str())
            .unwrap_or("backend");
        let err = match e.etype() {
            ErrorType::HTTPStatus(413) => {
                let limit = ctx
                    .api
                    .map(|i| self.state.apis[i].config().max_request_body_bytes)
                    .unwrap_or(0);
                GatewayError::body_too_large(limit)
            }
            ErrorType::HTTPStatus(503) if ctx.identity_failure.is_some() => GatewayError::new(
                503,
                format!(
                    "Backend authentication failed: could not obtain an Entra ID token for backend '{backend}' with {}.",
                    ctx.identity_failure.unwrap_or("its credential")
                ),
            ),
            ErrorType::HTTPStatus(code) => GatewayError::new(
                *code,
                sluice_policy::error::reason_phrase(*code).to_string(),
            ),
            ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout => {
                GatewayError::gateway_timeout(&format!(
                    "could not connect to backend '{backend}' in time"
                ))
            }
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                GatewayError::gateway_timeout(&format!(
                    "backend '{backend}' did not respond in time"
                ))
            }
            _ => match e.esource() {
                ErrorSource::Upstream => GatewayError::bad_gateway(&format!(
                    "the connection to backend '{backend}' failed ({})",
                    e.etype().as_str()
                )),
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::ReadError
                    | ErrorType::WriteError
                    | ErrorType::ConnectionClosed
                    | ErrorType::ReadTimedout
                    | ErrorType::WriteTimedout => return None,
                    _ => GatewayError::new(400, "Bad request"),
                },
                ErrorSource::Internal | ErrorSource::Unset => {
                    GatewayError::new(500, "Internal server error")
                }
            },
        };
        Some(err)
    }

    /// The peer for an attempt at `backend`: its address (DNS), its Entra ID
    /// token (kept on the context) and the attempt's timeouts.
    pub(crate) async fn peer_for(
        &self,
        ctx: &mut RequestContext,
        backend: usize,
    ) -> Result<Box<HttpPeer>> {
        let b = &self.state.backends[backend];
        // `connect_ms` is one budget for the whole way to a usable
        // connection: DNS, the backend's Entra ID token, TCP and TLS; it is
        // cut to what is left of the API's failover time (never for the
        // first attempt).
        let failover_left = self
            .state
            .selector
            .failover_left(ctx)
            .unwrap_or(b.connect_timeout);
        let budget = b
            .connect_timeout
            .min(failover_left)
            .max(Duration::from_millis(1));
        // The budget's deadline is set (the clock read) by the first thing
        // that may wait before the connect, a DNS lookup or a token; when
        // nothing does, the whole budget is left for the connect.
        let mut deadline = None;
        let mut deadline_from_now =
            || *deadline.get_or_insert_with(|| tokio::time::Instant::now() + budget);
        let lookup = match b.fixed_address() {
            Some(a) => Ok(Ok(a)),
            None => tokio::time::timeout_at(deadline_from_now(), b.address()).await,
        };
        let addr = match lookup {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                return Err(Error::because(
                    ErrorType::ConnectNoRoute,
                    "resolving the backend host",
                    e,
                )
                .into_up());
            }
            Err(_) => {
                return Err(Error::explain(
                    ErrorType::ConnectTimedout,
                    "resolving the backend host timed out",
                )
                .into_up());
            }
        };
        // Per attempt: a retry may pick a backend without `auth`.
        ctx.backend_bearer = None;
        ctx.identity_failure = None;
        if let Some(provider) = &b.token_provider {
            let failure = match tokio::time::timeout_at(deadline_from_now(), provider.token()).await
            {
                Ok(Ok(t)) => {
                    ctx.backend_bearer = Some(t);
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!(
                    "no token within the backend's connect timeout ({} ms)",
                    b.connect_timeout.as_millis()
                )),
            };
            if let Some(error) = failure {
                tracing::warn!(
                    backend = %b.name,
                    credential = provider.kind(),
                    %error,
                    "cannot obtain an Entra ID token for the backend"
                );
                ctx.identity_failure = Some(provider.kind());
                return Err(Error::explain(
                    ErrorType::HTTPStatus(503),
                    "no Entra ID token for the backend",
                ));
            }
        }
        // What is left of the budget bounds the TCP connect and the TLS
        // handshake together (at least 1 ms: zero would mean "no limit").
        let left = deadline.map_or(budget, |d| {
            d.saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_millis(1))
        });
        // SNI only means something over TLS.
        let sni = if b.tls { b.host.clone() } else { String::new() };
        // Built in its box: the peer is large, and moving it there after
        // building it costs a copy.
        let mut peer = Box::new(HttpPeer::new(addr, b.tls, sni));
        peer.options.connection_timeout = Some(left);
        peer.options.total_connection_timeout = Some(left);
        peer.options.read_timeout = Some(b.read_timeout);
        if ctx.realtime_call.is_some()
            && let Some(api) = ctx.api
        {
            // A WebSocket session waits for the backend as long as the
            // API's idle timeout, not `read_ms`.
            peer.options.read_timeout = Some(self.state.apis[api].config().websocket_idle);
        }
        peer.options.write_timeout = Some(b.write_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(90));
        Ok(peer)
    }

    /// Turn the client's request head into the backend's: path (with the
    /// backend's deployment name), query without the subscription key,
    /// `Host`, the backend's credential instead of the client's.
    pub(crate) fn rewrite_request(
        &self,
        session: &Session,
        upstream: &mut RequestHeader,
        ctx: &RequestContext,
    ) -> Result<()> {
        let (Some(api), Some(backend)) = (ctx.api, ctx.backend) else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no backend chosen",
            ));
        };
        let api = self.state.apis[api].config();
        let b = &self.state.backends[backend];
        let uri = &session.req_header().uri;
        let rest = uri.path().get(ctx.rest_offset..).unwrap_or("");
        let query = uri.query().map(|q| match ctx.realtime_call.as_deref() {
            // Without the browser's `api-key=`, with the backend's name
            // for the deployment.
            Some(call) => sluice_policy::realtime::upstream_query(
                q,
                call,
                &api.subscription.query_name,
                |d| b.deployments.get(d).map(String::as_str),
            ),
            None => {
                let q = strip_query_param(q, &api.subscription.query_name);
                if sluice_policy::realtime::is_realtime_path(rest).is_some() {
                    // The key a browser may put there (taken by
                    // authentication on these paths) never goes on.
                    Cow::Owned(
                        strip_query_param(&q, sluice_policy::realtime::KEY_PARAM).into_owned(),
                    )
                } else {
                    q
                }
            }
        });
        // Most calls reach the backend by the path they came with and lose
        // nothing from the query: then nothing is built and the URI is left
        // as pingora parsed it.
        let rename = |d: &str| b.deployments.get(d).map(String::as_str);
        let same_path = keeps_path(&b.base_path, uri.path(), rest, rename);
        let same_query = query
            .as_ref()
            .is_none_or(|q| matches!(q, Cow::Borrowed(q) if !q.is_empty()));
        let unchanged =
            same_path && same_query && uri.authority().is_none() && upstream.uri == *uri;
        if !unchanged {
            let mut target = upstream_path(&b.base_path, rest, rename);
            if let Some(q) = query.as_deref()
                && !q.is_empty()
            {
                target.push('?');
                target.push_str(q);
            }
            let uri = http::Uri::from_maybe_shared(Bytes::from(target)).map_err(|e| {
                Error::because(ErrorType::InternalError, "building the upstream URI", e)
            })?;
            upstream.set_uri(uri);
        }
        let backend_bearer = match &ctx.backend_bearer {
            Some(token) => Some(sensitive(&format!("Bearer {}", token.expose()))?),
            None => None,
        };
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        // One edit of the head (see `heads`): room for the credential and
        // the forwarded-for hop, the headers a request may gain.
        let bearer_sent = backend_bearer.is_some();
        let room = 1 + usize::from(b.api_key.is_some()) + usize::from(bearer_sent);
        crate::heads::edit_request(upstream, room, |h| {
            let host = match &b.host_value {
                Some(host) => host.clone(),
                None => http::HeaderValue::from_str(&b.host_header).map_err(|e| {
                    Error::because(ErrorType::InvalidHTTPHeader, "invalid backend host", e)
                })?,
            };
            h.insert(http::header::HOST, host);
            // The client's credentials never go on. A request carries a few
            // headers: they are walked once, instead of a lookup per name
            // (and `Expect` is looked for in the same walk).
            let credentials = &self.state.credential_headers;
            let lengths = self.state.credential_lengths;
            let mut expect = false;
            let present: smallvec::SmallVec<[usize; 4]> = h
                .keys()
                .filter_map(|k| {
                    // Most names are ruled out by their length alone.
                    if !lengths.may_hold(k) {
                        return None;
                    }
                    expect |= k == http::header::EXPECT;
                    credentials.iter().position(|c| c == k)
                })
                .collect();
            // A name the backend's own credential goes out under is
            // overwritten by it below (every value of it): no removal first.
            let overwritten = |name: &http::HeaderName| {
                (b.api_key.is_some() && *name == API_KEY)
                    || (bearer_sent && name == http::header::AUTHORIZATION)
            };
            for i in present {
                if !overwritten(&credentials[i]) {
                    h.remove(&credentials[i]);
                }
            }
            if expect
                && (matches!(ctx.body_mode, BodyMode::Preread | BodyMode::Held)
                    || ctx.continue_sent)
            {
                // The client's `Expect` was answered here (the body, or its
                // first parts, were read before routing).
                h.remove(http::header::EXPECT);
            }
            // Injected credentials are marked sensitive: pingora's logs print
            // header maps with `Debug`, which then shows `Sensitive`.
            if let Some(key) = &b.api_key {
                h.insert(API_KEY.clone(), key.clone());
            }
            if let Some(bearer) = backend_bearer {
                h.insert(http::header::AUTHORIZATION, bearer);
            }
            if ctx.strip_accept_encoding {
                h.remove(http::header::ACCEPT_ENCODING);
            }
            if ctx.realtime_call.is_some() {
                // No compression through the gateway: the frames stay
                // readable for usage (the backend then answers without the
                // extension).
                h.remove(http::header::SEC_WEBSOCKET_EXTENSIONS);
                // A browser client of OpenAI's own service may carry its key
                // as a subprotocol (`openai-insecure-api-key.<key>`): the
                // client's credential never goes on.
                let offered = h
                    .get(http::header::SEC_WEBSOCKET_PROTOCOL)
                    .and_then(|v| v.to_str().ok())
                    .map(sluice_policy::realtime::without_key_protocols);
                match offered {
                    Some(Some(kept)) => {
                        h.insert(http::header::SEC_WEBSOCKET_PROTOCOL, header_value(kept)?);
                    }
                    Some(None) => {
                        h.remove(http::header::SEC_WEBSOCKET_PROTOCOL);
                    }
                    None => {}
                }
            }
            if let Some(ip) = client {
                // One lookup of the name, whether the client sent it or not.
                match h.entry(X_FORWARDED_FOR.clone()) {
                    http::header::Entry::Occupied(mut e) => {
                        let hop = match e.get().to_str() {
                            Ok(prev) => {
                                use std::fmt::Write as _;
                                // One buffer: the earlier hops, then this one.
                                let mut xff = String::with_capacity(prev.len() + 2 + 39);
                                xff.push_str(prev);
                                xff.push_str(", ");
                                let _ = write!(xff, "{ip}");
                                header_value(xff)?
                            }
                            Err(_) => hop_value(ip),
                        };
                        // Every earlier value of the name goes.
                        e.insert(hop);
                    }
                    http::header::Entry::Vacant(e) => {
                        e.insert(hop_value(ip));
                    }
                }
            }
            Ok::<_, Box<Error>>(())
        })??;
        Ok(())
    }

    /// A call that names an object a backend owns (a stored response, a
    /// file, a batch...) goes to that backend, or seeks it when the owner is
    /// not known; a call that creates one is noted, to learn its id from
    /// the answer.
    async fn route_owned(
        &self,
        session: &Session,
        ctx: &mut RequestContext,
        op: sluice_tokens::Operation,
        body: Option<&[u8]>,
        top: &BodyTop,
    ) {
        let req = session.req_header();
        let rest = req.uri.path().get(ctx.rest_offset..).unwrap_or("");
        let method = req.method.as_str();
        // The hot generation calls (their path ends in the operation) name no
        // owned object, in their path or body; a chat completion creates one
        // only when it asks to be stored. They are settled with a look for
        // `"store"` and nothing more.
        let hot = is_hot(op);
        if hot {
            if op == sluice_tokens::Operation::ChatCompletions
                && req.method == http::Method::POST
                && let Some(b) = body
            {
                note_stored_chat(ctx, b, top);
            }
            return;
        }
        let in_path = sluice_routing::owned_id_in_path(rest);
        let named: Vec<String> = match (in_path, body) {
            (Some((_, id)), _) => vec![id.to_string()],
            (None, Some(b)) if !hot && req.method == http::Method::POST => {
                sluice_routing::owned_ids_in_body(b)
                    .into_iter()
                    .map(|(_, id)| id)
                    .collect()
            }
            _ => Vec::new(),
        };
        let creates = sluice_routing::creates(method, rest).is_some_and(|kind| {
            // Chat completions were settled above; this is the deployments
            // form `/deployments/{d}/chat/completions` seen as a collection.
            kind != sluice_routing::OwnedKind::ChatCompletion
                || body.is_some_and(sluice_routing::asks_to_store)
        });
        if named.is_empty() && !creates {
            return;
        }
        // The call is about the object itself (`/files/{id}`), not
        // something below it (`/vector_stores/{id}/files/{file}`): only then
        // does deleting it, or a 404, mean the object is gone.
        let itself = in_path.is_some_and(|(_, id)| {
            rest.split(['?', '#'])
                .next()
                .unwrap_or(rest)
                .trim_end_matches('/')
                .ends_with(id)
        });
        let mut call = sluice_policy::affinity::OwnedCall {
            creates,
            deletes: itself && req.method == http::Method::DELETE,
            itself,
            ..Default::default()
        };
        if !named.is_empty() {
            let mut owner = None;
            for id in &named {
                if let Some(name) = self.state.affinity.owner(id).await
                    && let Some(i) = self.state.backends.iter().position(|b| *b.name == *name)
                {
                    owner = Some((id.clone(), i));
                    break;
                }
            }
            let pinned_to = owner
                .as_ref()
                .map(|(_, b)| self.state.backends[*b].name.clone());
            ctx.trace(sluice_trace::Section::Inbound, "affinity", || {
                let message = match &pinned_to {
                    Some(_) => "The call names an object its backend owns: it goes there, with no failover.",
                    None => "The call names an object whose backend is not known: the backends are asked in turn until one does not answer 404.",
                };
                sluice_trace::record::Val::obj([
                    ("message", message.into()),
                    ("backend", sluice_trace::record::Val::from(pinned_to.clone())),
                ])
            });
            match owner {
                Some((id, backend)) => {
                    self.state.selector.set_affinity(ctx, Some(backend));
                    self.state
                        .affinity_total
                        .with_label_values(&["pinned"])
                        .inc();
                    call.named = Some(id);
                    call.pinned = true;
                }
                None => {
                    self.state.selector.set_affinity(ctx, None);
                    call.named = named.into_iter().next();
                }
            }
        }
        ctx.owned = Some(Box::new(call));
    }

    /// At the end of a call that named or created a backend-owned object:
    /// remember who owns what was created or found, forget what is gone.
    async fn settle_owned(&self, ctx: &mut RequestContext) {
        let Some(call) = ctx.owned.take() else { return };
        let status = ctx.upstream_status;
        let ok = (200..300).contains(&status);
        let backend = ctx.backend.and_then(|i| self.state.backends.get(i));
        let count = |result: &str| {
            self.state.affinity_total.with_label_values(&[result]).inc();
        };
        if let Some(named) = &call.named {
            if call.pinned {
                if (call.itself && status == 404) || (call.deletes && ok) {
                    self.state.affinity.forget(named).await;
                    count("forgotten");
                }
            } else if let Some(owner) = self.state.selector.found_owner(ctx)
                && let Some(b) = self.state.backends.get(owner)
            {
                count("found");
                if !(call.deletes && ok) {
                    self.state
                        .affinity
                        .remember(named, b.name.as_str().into())
                        .await;
                }
            } else if status == 404 {
                count("not_found");
            }
        }
        if call.creates
            && ok
            && let Some(b) = backend
        {
            let id = ctx
                .usage_scanner
                .as_ref()
                .and_then(|s| s.object_id())
                .or_else(|| call.id_scanner.as_ref().and_then(|s| s.object_id()));
            if let Some(id) = id {
                self.state
                    .affinity
                    .remember(id, b.name.as_str().into())
                    .await;
                count("learned");
            }
        }
    }

    /// Prepare the body of this attempt when the request's body is edited
    /// (the v1 `model` renamed for the attempt's backend, usage asked of a
    /// stream): its length, for the attempt's `Content-Length`.
    pub(crate) fn edit_for_attempt(&self, ctx: &mut RequestContext) -> Option<usize> {
        let edit = ctx.edit.as_mut()?;
        let backend = self.state.backends.get(ctx.backend?)?;
        let rename = edit
            .plan
            .model()
            .and_then(|m| backend.deployments.get(m))
            .cloned();
        Some(match edit.for_attempt(rename.as_deref()) {
            Some(b) => b.len(),
            None => edit.body.len(),
        })
    }

    /// A `200` (or other) JSON answer the gateway makes itself, with the
    /// trace's header when the request is traced.
    fn answer_json<'a>(
        &'a self,
        session: &'a mut Session,
        ctx: &'a mut RequestContext,
        status: u16,
        body: Bytes,
    ) -> Answer<'a> {
        Box::pin(Self::answer_json_now(session, ctx, status, body))
    }

    async fn answer_json_now(
        session: &mut Session,
        ctx: &mut RequestContext,
        status: u16,
        body: Bytes,
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(status, Some(3))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", body.len().to_string())?;
        if let Some((name, value)) = Self::trace_headers(ctx) {
            resp.insert_header(name, value)?;
        }
        ctx.upstream_status = status;
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }

    /// Start a multipart body that streams to the backend: with `boundary`
    /// (a v1 upload, whose deployment is its `model` field), read its parts
    /// up to and including that field, at most [`FORM_PREFIX_LIMIT`] bytes,
    /// and keep them to send ahead of the rest (`ctx.body_prefix`). A body
    /// that ends within them is returned whole (`Some`): it is then held.
    async fn read_form_prefix(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        limit: u64,
        boundary: Option<&str>,
    ) -> Result<std::result::Result<Option<Bytes>, GatewayError>> {
        use sluice_tokens::multipart::{RangeSearch, find_field_range};
        ctx.body_mode = BodyMode::Streamed;
        let Some(boundary) = boundary else {
            return Ok(Ok(None));
        };
        if expects_continue(session) {
            let cont = ResponseHeader::build(100, Some(0))?;
            session.write_response_header(Box::new(cont), false).await?;
            ctx.continue_sent = true;
        }
        let mut prefix = BytesMut::new();
        // The parts are looked through again only once the prefix has grown
        // by half (at least 1 KiB): a body trickling in byte by byte costs a
        // few passes, not one per byte.
        let mut next_look = 0;
        let mut found = None;
        loop {
            let search = if prefix.len() >= next_look || prefix.len() >= FORM_PREFIX_LIMIT {
                next_look = prefix.len() + (prefix.len() / 2).max(1024);
                find_field_range(&prefix, boundary, "model")
            } else {
                RangeSearch::NeedMore
            };
            match search {
                RangeSearch::Found(range) => {
                    found = Some(range);
                    break;
                }
                RangeSearch::Absent => break,
                RangeSearch::NeedMore if prefix.len() >= FORM_PREFIX_LIMIT => break,
                RangeSearch::NeedMore => {}
            }
            match session.read_request_body().await? {
                Some(chunk) => {
                    prefix.extend_from_slice(&chunk);
                    if prefix.len() as u64 > limit {
                        return Ok(Err(GatewayError::body_too_large(limit)));
                    }
                }
                None => break,
            }
        }
        if session.is_body_done() {
            // Read whole: routed (and renamed) like any body read whole.
            ctx.body_len = prefix.len() as u64;
            return Ok(Ok(Some(prefix.freeze())));
        }
        let prefix = prefix.freeze();
        if let Some(range) = found
            && let Ok(model) = std::str::from_utf8(&prefix[range.clone()])
        {
            ctx.deployment = Some(model.to_string());
            let renamed = self
                .state
                .backends
                .iter()
                .any(|be| be.deployments.contains_key(model));
            if renamed {
                // Each attempt sends the prefix with its backend's name.
                ctx.edit = Some(Box::new(BodyEdit {
                    plan: BodyPlan::form_model(range, model.to_string()),
                    body: prefix.clone(),
                    attempt: None,
                }));
            }
        }
        if !prefix.is_empty() {
            ctx.body_prefix = Some(prefix);
        }
        Ok(Ok(None))
    }

    /// Read the whole body before routing. With `retry_buffer` (bodies up
    /// to 64 KiB) pingora keeps its own copy and replays it on every
    /// attempt; larger bodies are sent by [`Gateway::relay`] from this one.
    async fn preread_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        limit: u64,
        content_length: Option<u64>,
        retry_buffer: bool,
    ) -> Result<std::result::Result<(Bytes, BodyTop), GatewayError>> {
        if retry_buffer {
            session.enable_retry_buffering();
        }
        // A client that waits for `100 Continue` (curl does for large bodies)
        // gets it now, since the body is read before any backend is chosen.
        if expects_continue(session) {
            let cont = ResponseHeader::build(100, Some(0))?;
            session.write_response_header(Box::new(cont), false).await?;
            ctx.continue_sent = true;
        }
        let declared = content_length.unwrap_or(0).min(limit);
        // A body that arrives in one chunk (most small ones) is kept as
        // pingora read it; only one in several chunks is copied together.
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        while let Some(chunk) = session.read_request_body().await? {
            match first.take() {
                None if buf.is_empty() => first = Some(chunk),
                held => {
                    if buf.is_empty() {
                        buf.reserve(usize::try_from(declared).unwrap_or(0));
                    }
                    if let Some(held) = held {
                        buf.extend_from_slice(&held);
                    }
                    buf.extend_from_slice(&chunk);
                }
            }
            let read = first.as_ref().map_or(buf.len(), Bytes::len);
            if read as u64 > limit {
                return Ok(Err(GatewayError::body_too_large(limit)));
            }
            // A body whose end came with this chunk (a Content-Length body
            // read whole, the last chunk of a chunked one) needs no further
            // read to learn that it is over.
            if session.is_body_done() {
                break;
            }
        }
        let body = match first {
            Some(whole) => whole,
            None => buf.freeze(),
        };
        ctx.body_len = body.len() as u64;
        // One walk finds the members read before routing: the stream flag
        // now, the body plan later.
        let top = BodyTop::read(&body);
        ctx.stream = top.stream_flag(&body);
        ctx.body_mode = BodyMode::Preread;
        Ok(Ok((body, top)))
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    // Boxed: pingora keeps the context by value in each request's future
    // and moves it a few times on the way; a pointer is cheaper to move
    // than the context's 744 bytes.
    type CTX = Box<RequestContext>;

    fn new_ctx(&self) -> Self::CTX {
        Box::new(RequestContext {
            in_flight: Some(sluice_policy::context::InFlight::new(&self.state.in_flight)),
            ..RequestContext::default()
        })
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let path = session.req_header().uri.path();
        if path == STATUS_PATH {
            answer_status(session).await?;
            return Ok(true);
        }
        if sluice_policy::route::has_dot_segments(path) {
            respond(session, &GatewayError::not_found(), false).await?;
            return Ok(true);
        }
        let Some(m) = self.state.router.route(path) else {
            respond(session, &GatewayError::not_found(), false).await?;
            return Ok(true);
        };
        let rest_offset = path.len() - m.rest.len();
        let api_index = m.index;
        ctx.api = Some(api_index);
        ctx.rest_offset = rest_offset;
        self.begin_trace(session, ctx, api_index);
        let api = self.state.apis[api_index].config();

        // A declared body over the limit is refused before anything else.
        let limit = api.max_request_body_bytes;
        // The request headers the body step reads, in one walk.
        let head = HeadFacts::read(&session.req_header().headers);
        let content_length = head.content_length;
        if content_length.is_some_and(|n| n > limit) {
            self.refuse(session, ctx, &GatewayError::body_too_large(limit), false)
                .await?;
            return Ok(true);
        }
        let client_ip = self.client_ip(session);

        // Authentication and the steps that need only the head, before any
        // of the body is read (and before `100 Continue` is sent).
        let pipeline = &self.state.apis[api_index].pipeline;
        let verdict = {
            let req = session.req_header();
            let inbound = inbound_request(req, client_ip, rest_offset, None);
            pipeline
                .inbound_head(&inbound, ctx, &self.state.shared)
                .await
        };
        if let Err(e) = verdict {
            self.refuse(session, ctx, &e, false).await?;
            return Ok(true);
        }
        let is_post = session.req_header().method == http::Method::POST;
        // The path's deployment, found once: where it is in the path after
        // the API's prefix (routing reads it again below).
        let (v1, path_deployment, models, op) = {
            let rest = session
                .req_header()
                .uri
                .path()
                .get(rest_offset..)
                .unwrap_or("");
            let models = (session.req_header().method == http::Method::GET)
                .then(|| crate::models::models_call(rest))
                .flatten()
                .map(|call| self.state.apis[api_index].models.answer(call));
            let deployment = sluice_policy::route::deployment_range(rest);
            let op = sluice_tokens::Operation::from_path(rest);
            (rest.starts_with("/v1/"), deployment, models, op)
        };
        let model_in_body = path_deployment.is_none();
        if let Some((status, body)) = models {
            self.answer_json(session, ctx, status, body).await?;
            return Ok(true);
        }
        // A Realtime handshake: the deployment is in the query, and the
        // session, once upgraded, is idle-timed by the API's own setting.
        if head.upgrade && session.is_upgrade_req() {
            let call = {
                let req = session.req_header();
                let rest = req.uri.path().get(rest_offset..).unwrap_or("");
                (req.method == http::Method::GET)
                    .then(|| sluice_policy::realtime::realtime_call(rest, req.uri.query()))
                    .flatten()
            };
            let with_body = content_length.is_some_and(|n| n > 0) || head.transfer_encoding;
            let Some(call) = call.filter(|_| !with_body) else {
                // Anything else asking to upgrade would be an unmetered
                // tunnel: only the Realtime handshake (a GET, no body) is.
                let e = GatewayError::new(
                    400,
                    "WebSocket upgrades are served only for the Realtime API: a GET of {api path}/v1/realtime?model=... or {api path}/realtime?api-version=...&deployment=..., without a body.",
                );
                self.refuse(session, ctx, &e, false).await?;
                return Ok(true);
            };
            {
                let Some(deployment) = call.deployment.clone() else {
                    let e = GatewayError::new(
                        400,
                        format!(
                            "The Realtime handshake names no deployment: add '{}=<deployment>' to the query.",
                            call.deployment_param()
                        ),
                    );
                    self.refuse(session, ctx, &e, false).await?;
                    return Ok(true);
                };
                ctx.deployment = Some(deployment);
                session.set_read_timeout(Some(api.websocket_idle));
                ctx.realtime_call = Some(Box::new(call));
            }
        }

        // The caller is known: read small bodies before routing.
        let chunked = head.chunked;
        let mut body = None;
        let mut top = BodyTop::default();
        // A multipart upload (audio, images, files) over 64 KiB streams to
        // one backend; on v1 its `model` field is read first, from the
        // parts before the file.
        // One look at a POST's Content-Type: JSON, or multipart's boundary.
        let (json_body, boundary) = match is_post.then_some(head.content_type).flatten() {
            Some(ContentType::Json) => (true, None),
            Some(ContentType::Multipart(b)) => (false, Some(b)),
            _ => (false, None),
        };
        let large = content_length.is_none_or(|n| n > PREREAD_LIMIT);
        // A small body that nothing reads before routing (no step waits for
        // it, no usage is measured, the request is not traced, the path
        // names the deployment, the call owns nothing) is not read here: it
        // passes to the backend as pingora reads it, and pingora's retry
        // buffer replays it on a failover (`BodyMode::Passed`). A client
        // waiting for `100 Continue` is answered here instead, as before.
        let passes = is_post
            && !chunked
            && content_length.is_some_and(|n| n > 0 && n <= PREREAD_LIMIT)
            && boundary.is_none()
            && !model_in_body
            && ctx.trace.is_none()
            && ctx.realtime_call.is_none()
            && !pipeline.has_body_steps()
            && !pipeline.needs_usage()
            && is_hot(op)
            && !head.expect_continue;
        match content_length {
            Some(0) => {}
            _ if passes => {
                ctx.body_mode = BodyMode::Passed;
                ctx.passed_chat = op == sluice_tokens::Operation::ChatCompletions;
            }
            _ if boundary.is_some() && large && (content_length.is_some() || chunked) => {
                let boundary = boundary.as_deref().unwrap_or_default();
                match self
                    .read_form_prefix(session, ctx, limit, model_in_body.then_some(boundary))
                    .await?
                {
                    Ok(Some(whole)) => {
                        // The whole body came with the prefix: it is held
                        // and sent by the gateway, like any held body.
                        ctx.body_mode = BodyMode::Held;
                        body = Some(whole);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.refuse(session, ctx, &e, ctx.continue_sent).await?;
                        return Ok(true);
                    }
                }
            }
            Some(n) if n <= PREREAD_LIMIT && !chunked => {
                // Small bodies: read now with pingora's retry buffer, which
                // replays them on every attempt.
                ctx.body_hold = self.state.body_budget.reserve(n);
                match self
                    .preread_body(session, ctx, limit, content_length, true)
                    .await?
                {
                    Ok((b, t)) => {
                        body = Some(b);
                        top = t;
                    }
                    Err(e) => {
                        self.refuse(session, ctx, &e, ctx.continue_sent).await?;
                        return Ok(true);
                    }
                }
            }
            _ if content_length.is_some() || chunked => {
                // Larger or chunked bodies are held whole for replay when the
                // budget allows (a chunked one reserves the API's limit until
                // its size is known); the gateway then runs the attempts
                // itself. Otherwise the body streams to one backend.
                let want = content_length.unwrap_or(limit);
                match self.state.body_budget.reserve(want) {
                    Some(mut hold) => match self
                        .preread_body(session, ctx, limit, content_length, false)
                        .await?
                    {
                        Ok((b, t)) => {
                            top = t;
                            hold.shrink_to(b.len() as u64);
                            ctx.body_hold = Some(hold);
                            ctx.body_mode = BodyMode::Held;
                            body = Some(b);
                        }
                        Err(e) => {
                            self.refuse(session, ctx, &e, ctx.continue_sent).await?;
                            return Ok(true);
                        }
                    },
                    None => {
                        self.state.replay_skipped.inc();
                        ctx.body_mode = BodyMode::Streamed;
                    }
                }
            }
            _ => {}
        }
        if ctx.trace.is_some()
            && let Some(b) = &body
        {
            self.trace_request_body(ctx, b);
        }
        // The v1 API names the deployment in the body's `model`; it decides
        // the pool, and may be renamed per backend. A body that streams to
        // the backend (no room to hold it) cannot be read for it first.
        let routes_by_model = self.state.apis[api_index].routes_by_model;
        // A JSON call whose path names no deployment (the v1 API, and the
        // api-version Responses API) names it in the body's `model`.
        let wants_model = is_post && model_in_body && json_body;
        // A chat or completions stream that may be asked for its usage.
        let asks_usage = is_post && pipeline.needs_usage() && ctx.stream && {
            let req = session.req_header();
            matches!(
                op,
                sluice_tokens::Operation::ChatCompletions | sluice_tokens::Operation::Completions
            ) && (v1
                || req.uri.query().is_some_and(|q| {
                    sluice_policy::route::query_param(q, "api-version").is_some_and(|v| {
                        api_version_takes_stream_options(&String::from_utf8_lossy(&v))
                    })
                }))
        };
        let mut plan = None;
        if is_post
            && model_in_body
            && let (Some(b), Some(boundary)) = (&body, boundary.as_deref())
            && let sluice_tokens::multipart::RangeSearch::Found(r) =
                sluice_tokens::multipart::find_field_range(b, boundary, "model")
            && let Ok(m) = std::str::from_utf8(&b[r.clone()])
        {
            // A multipart body read whole: its `model` field routes it, and
            // is renamed per backend like a JSON body's.
            ctx.deployment = Some(m.to_string());
            plan = Some(BodyPlan::form_model(r, m.to_string()));
        }
        if wants_model || asks_usage {
            match &body {
                Some(b) => {
                    let p = BodyPlan::read(b, &top);
                    if wants_model && let Some(m) = p.model() {
                        ctx.deployment = Some(m.to_string());
                    }
                    plan = Some(p);
                }
                None if wants_model && routes_by_model && ctx.body_mode == BodyMode::Streamed => {
                    let busy = GatewayError::new(
                        503,
                        "The gateway is holding as many request bodies as it may; retry shortly.",
                    )
                    .with_header("retry-after", "1");
                    self.refuse(session, ctx, &busy, ctx.continue_sent).await?;
                    return Ok(true);
                }
                None => {}
            }
        }

        // The API's remaining policies, which need the body. A body that
        // streams to the backend (over 64 KiB, or chunked) has them run at its
        // end, from a copy, before its last bytes are released.
        // A multipart upload has no prompt to estimate: its steps run now,
        // without the body, and nothing of it is copied.
        let deferred =
            ctx.body_mode == BodyMode::Streamed && pipeline.has_body_steps() && boundary.is_none();
        if deferred {
            ctx.body_steps_deferred = true;
        } else {
            let verdict = {
                let req = session.req_header();
                let inbound = inbound_request(req, client_ip, rest_offset, body.as_deref());
                pipeline
                    .inbound_body(&inbound, ctx, &self.state.shared)
                    .await
            };
            if let Err(e) = verdict {
                // Reservations made before the refusal are returned at `logging`.
                self.refuse(session, ctx, &e, ctx.continue_sent).await?;
                return Ok(true);
            }
        }
        if let (Some(mut p), Some(b)) = (plan, &body) {
            if asks_usage {
                p.ask_usage(b);
                ctx.usage_asked = p.adds_usage();
            }
            let renamed = p.model().is_some_and(|m| {
                self.state
                    .backends
                    .iter()
                    .any(|be| be.deployments.contains_key(m))
            });
            if renamed || p.adds_usage() {
                ctx.edit = Some(Box::new(BodyEdit {
                    plan: p,
                    body: b.clone(),
                    attempt: None,
                }));
            }
        }
        for h in pipeline.header_dimensions() {
            let v = session
                .req_header()
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if let Some(v) = v {
                ctx.metric_headers.push((h.clone(), v));
            }
        }
        if pipeline.needs_usage() {
            // Usage must be readable: no compressed answers from the backend.
            ctx.strip_accept_encoding = true;
        }
        if ctx.body_mode == BodyMode::Streamed && ctx.trace.is_some() {
            ctx.request_tally = Some(Box::new(sluice_trace::record::Tally::new(
                self.state.traces.body_bytes,
            )));
        }
        if ctx.body_mode == BodyMode::Streamed
            && (pipeline.needs_usage() || deferred)
            && boundary.is_none()
        {
            // Keep a bounded copy: for the deferred steps, and to estimate
            // the prompt once it has passed.
            ctx.streamed_body_copy = Some(Vec::new());
        }
        // Routing: the pool for the deployment, and what the request needs
        // (its token estimate, else a rough one from the body's size).
        let need = ctx
            .estimate
            .as_ref()
            .map(|e| {
                u64::from(e.prompt_tokens)
                    + u64::from(e.max_completion_tokens.unwrap_or(0))
                        * u64::from(e.choices.unwrap_or(1))
            })
            .or_else(|| {
                match ctx.body_mode {
                    // Not read yet: its declared length.
                    BodyMode::Passed => content_length,
                    _ => body.as_ref().map(|b| b.len() as u64),
                }
                .map(|n| n / 4)
            });
        {
            let req = session.req_header();
            let rest = req.uri.path().get(rest_offset..).unwrap_or("");
            let deployment = path_deployment.and_then(|r| rest.get(r));
            // The path was classified above: a model endpoint's POST is a
            // generation call without a second look at the path.
            let kind = sluice_routing::call_kind_with(
                req.method.as_str(),
                rest,
                op != sluice_tokens::Operation::Other,
            );
            self.state
                .selector
                .begin_with(ctx, api_index, kind, deployment, need);
        }
        self.route_owned(session, ctx, op, body.as_deref(), &top)
            .await;
        if ctx.body_mode == BodyMode::Held {
            let body = body.unwrap_or_default();
            // Boxed: the relay's state is large, and inline it would make
            // every request's `request_filter` future (built and moved for
            // each request) that much larger.
            Box::pin(self.relay(session, ctx, body)).await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if ctx.realtime.is_some() {
            return self.realtime_client_frames(ctx);
        }
        if ctx.body_mode == BodyMode::Passed {
            passed_body(session, body.as_ref(), end_of_stream, ctx);
            return Ok(());
        }
        if ctx.body_mode != BodyMode::Streamed {
            // A body read before routing is sent from pingora's retry
            // buffer, whole, on every attempt: edited for the attempt's
            // backend when it has to be.
            if body.is_some()
                && let Some(edited) = ctx.edit.as_mut().and_then(|e| e.attempt.take())
            {
                *body = Some(edited);
            }
            return Ok(());
        }
        let limit = ctx
            .api
            .map(|i| self.state.apis[i].config().max_request_body_bytes)
            .unwrap_or(u64::MAX);
        if ctx.prefix_pending
            && let Some(prefix) = ctx
                .edit
                .as_mut()
                .and_then(|e| e.attempt.take())
                .or_else(|| ctx.body_prefix.clone())
        {
            // The parts read before routing go out ahead of the rest, on
            // every attempt (and are counted once).
            // (A later attempt only follows one that sent nothing.)
            ctx.prefix_pending = false;
            let rest = body.take().unwrap_or_default();
            let mut all = BytesMut::with_capacity(prefix.len() + rest.len());
            all.extend_from_slice(&prefix);
            all.extend_from_slice(&rest);
            *body = Some(all.freeze());
        }
        if let Some(b) = body {
            ctx.body_len += b.len() as u64;
            if ctx.body_len > limit {
                return Err(status_error(413, "request body over the limit"));
            }
            if let Some(t) = ctx.request_tally.as_mut() {
                t.feed(b);
            }
            ctx.body_probe.feed(b);
            // The deferred steps need the whole body (it is bounded by the
            // API's limit, checked above); an estimate alone makes do with
            // the first MiB.
            let cap = if ctx.body_steps_deferred {
                usize::MAX
            } else {
                STREAMED_ESTIMATE_LIMIT
            };
            if let Some(copy) = ctx.streamed_body_copy.as_mut() {
                if copy.len() + b.len() <= cap {
                    copy.extend_from_slice(b);
                } else {
                    ctx.streamed_body_copy = None;
                }
            }
        }
        if end_of_stream {
            ctx.stream = ctx.body_probe.finish();
            if let Some(t) = ctx.request_tally.take() {
                self.trace_streamed_body(ctx, &t);
            }
            let Some(api) = ctx.api else { return Ok(()) };
            let pipeline = &self.state.apis[api].pipeline;
            let copy = ctx.streamed_body_copy.take();
            if std::mem::take(&mut ctx.body_steps_deferred) {
                // The last chunk is held here until the steps have decided:
                // a refusal aborts the upstream request before it is complete,
                // so the backend never acts on it.
                // The head phase recorded the client's address.
                let verdict = {
                    let req = session.req_header();
                    let inbound =
                        inbound_request(req, ctx.client_ip, ctx.rest_offset, copy.as_deref());
                    pipeline
                        .inbound_body(&inbound, ctx, &self.state.shared)
                        .await
                };
                if let Err(e) = verdict {
                    let status = e.status;
                    ctx.refusal = Some(Box::new(e));
                    return Err(status_error(
                        status,
                        "refused by a policy at the end of the body",
                    ));
                }
            } else if let Some(copy) = copy {
                pipeline.streamed_body_done(ctx, copy).await;
            }
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        loop {
            let backend = match self.state.selector.next_backend(ctx) {
                Ok(b) => b,
                Err(refusal) => {
                    let status = refusal.status;
                    ctx.refusal = Some(Box::new(refusal));
                    return Err(status_error(status, "every backend of the pool is resting"));
                }
            };
            match self.peer_for(ctx, backend).await {
                Ok(peer) => return Ok(peer),
                Err(e) => {
                    // No address or no token: the backend never saw the
                    // request, so another one may take it.
                    let replayable = replayable_now(session, ctx);
                    match self.state.selector.after_connect_error(
                        ctx,
                        Outcome::ConnectFailed,
                        replayable,
                    ) {
                        After::Retry => continue,
                        After::Refuse(refusal) => {
                            let status = refusal.status;
                            ctx.refusal = Some(Box::new(refusal));
                            return Err(status_error(
                                status,
                                "every backend of the pool is resting",
                            ));
                        }
                        After::Deliver => return Err(e),
                    }
                }
            }
        }
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        if upstream_response.status.is_informational()
            && !(status == 101 && ctx.realtime_call.is_some())
        {
            return Ok(());
        }
        self.trace_backend_head(ctx, upstream_response);
        let replayable = replayable_now(session, ctx);
        let headers = RoutingHeaders::read(&upstream_response.headers);
        let get = |n: &str| headers.get(n);
        match self
            .state
            .selector
            .after_status(ctx, status, get, replayable)
        {
            After::Deliver => {
                // This answer goes to the client: the body is not needed again.
                ctx.body_hold = None;
                ctx.edit = None;
                Ok(())
            }
            After::Retry => {
                let mut e = Error::explain(ErrorType::HTTPStatus(status), "failing over");
                e.set_retry(true);
                Err(e)
            }
            After::Refuse(refusal) => {
                ctx.refusal = Some(Box::new(refusal));
                Err(status_error(status, "every backend of the pool is resting"))
            }
        }
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        self.rewrite_request(session, upstream, ctx)?;
        ctx.prefix_pending = ctx.body_prefix.is_some();
        if let Some(len) = self.edit_for_attempt(ctx) {
            // A streamed upload's edit is its prefix: the rest follows as sent.
            let total = match &ctx.body_prefix {
                Some(prefix) => {
                    content_length(session).map(|n| n as usize - prefix.len().min(n as usize) + len)
                }
                None => Some(len),
            };
            if let Some(total) = total {
                upstream.insert_header(http::header::CONTENT_LENGTH, total.to_string())?;
            }
        }
        self.trace_forward(ctx, upstream);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let switching = upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS
            && ctx.realtime_call.is_some();
        if upstream_response.status.is_informational() && !switching {
            return Ok(());
        }
        // The pipeline reads the head before the gateway's own headers go
        // in (borrowed: nothing of it is copied but the region it keeps).
        let status = upstream_response.status;
        let region_sent = upstream_response.headers.contains_key(&X_MS_REGION);
        let backend = ctx.backend.and_then(|i| self.state.backends.get(i));
        let (sse, creates_owned) = match ctx.api {
            Some(api) => {
                let headers = &upstream_response.headers;
                let content_type = headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok());
                let pipeline = &self.state.apis[api].pipeline;
                // Kept only for what reads it: a metric's `backend_region`
                // and the request summaries.
                let keep_region = pipeline.reads_region() || self.state.traces.ring.capacity() != 0;
                let region = if !keep_region {
                    None
                } else if region_sent {
                    // Shared with the backend's label when it is the same.
                    headers.get(&X_MS_REGION).and_then(|v| v.to_str().ok()).map(
                        |sent| match backend {
                            Some(b) if *b.region == *sent => b.region.clone(),
                            _ => Arc::from(sent),
                        },
                    )
                } else {
                    backend.map(|b| b.region.clone())
                };
                pipeline.start_response(ctx, status.as_u16(), content_type, region);
                if switching {
                    self.open_realtime(ctx, api);
                }
                let sse = content_type.is_some_and(|c| c.starts_with("text/event-stream"));
                let creates = status.is_success()
                    && ctx.usage_scanner.is_none()
                    && ctx.owned.as_ref().is_some_and(|c| c.creates);
                (sse, creates)
            }
            None => (false, false),
        };
        // The gateway's headers go in with one edit of the head (see
        // `heads`). Header values are shared, never copied: the stream
        // flag's two values are static and the backend's region is built once.
        let region = if region_sent {
            None
        } else {
            backend.and_then(|b| b.region_header.clone())
        };
        // Remaining/consumed tokens describe a charge; failed calls are
        // refunded. Read once (this is the response the client gets): the
        // values move into the head instead of being copied.
        let charged = if status.is_success() {
            std::mem::take(&mut ctx.response_headers)
        } else {
            Vec::new()
        };
        // The client gets fewer bytes than the backend sent.
        let shortened = ctx.api.is_some() && status.is_success() && ctx.usage_asked && sse;
        let trace = Self::trace_headers(ctx);
        let room = usize::from(!switching)
            + usize::from(region.is_some())
            + charged.len()
            + usize::from(trace.is_some());
        if room > 0 || shortened {
            crate::heads::edit_response(upstream_response, room, |h| {
                if !switching {
                    h.insert(
                        X_MS_STREAM.clone(),
                        http::HeaderValue::from_static(stream_tag::header_value(ctx.stream)),
                    );
                }
                if let Some(region) = region {
                    h.insert(X_MS_REGION.clone(), region);
                }
                for (name, value) in charged {
                    h.insert(name, header_value(value)?);
                }
                if shortened {
                    h.remove(http::header::CONTENT_LENGTH);
                }
                if let Some((name, value)) = trace {
                    // Only on traced requests: parsed like any name.
                    let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| {
                        Error::because(ErrorType::InvalidHTTPHeader, "invalid header name", e)
                    })?;
                    h.insert(name, header_value(value)?);
                }
                Ok::<_, Box<Error>>(())
            })?;
        }
        if ctx.api.is_some() {
            if shortened {
                ctx.usage_filter = Some(Box::default());
            }
            if creates_owned && let Some(call) = ctx.owned.as_mut() {
                // Only the id is wanted; counting (no prompt) is dropped
                // with the scanner once the id is found.
                call.id_scanner = Some(sluice_tokens::UsageScanner::new(
                    sse,
                    sluice_tokens::Encoding::O200kBase,
                    0,
                ));
            }
        }
        self.trace_response(ctx, upstream_response);
        Ok(())
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // pingora refuses to retry POSTs by default: every retry here is the
        // routing's decision. One planned in `upstream_response_filter`
        // (a 429 or 5xx with another backend to go to) stands.
        if ctx.routing.planned.is_some() {
            e.set_retry(true);
            return e;
        }
        let stale_pooled = client_reused && matches!(e.retry, pingora::RetryType::ReusedOnly);
        if ctx.refusal.is_some()
            || matches!(e.etype(), ErrorType::HTTPStatus(_))
            || e.esource() == &ErrorSource::Downstream
            || final_response_written(session)
        {
            e.set_retry(false);
            return e;
        }
        let replayable = replayable_now(session, ctx);
        if stale_pooled && replayable && self.state.selector.retry_same(ctx) {
            // A pooled connection the backend had already closed: not the
            // backend's fault, so the same backend gets the request again
            // (once, and not for calls that create state).
            e.set_retry(true);
            return e;
        }
        let after = self
            .state
            .selector
            .after_error(ctx, outcome_of(&e), replayable);
        retry_as_decided(&mut e, after, ctx);
        e
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Self::CTX, e: &Error) -> bool {
        // Expected outcomes are not failures: a body over the limit, a client
        // that went away, the gateway's own answer when every backend rests.
        matches!(e.etype(), ErrorType::HTTPStatus(400..=499))
            || e.esource() == &ErrorSource::Downstream
    }

    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &Self::CTX,
        e: &Error,
        context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        // A failover the routing planned is expected, not a warning; the
        // attempt is in the metrics and on the request's context.
        let planned = matches!(context, pingora::proxy::ProxyWarnLogContext::UpstreamRetry)
            && ctx.routing.planned.is_some();
        if planned {
            tracing::debug!(error = %e, "failing over to another backend");
        }
        planned
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(b) = ctx.backend.and_then(|i| self.state.backends.get(i)) {
            b.connect_failed();
            tracing::debug!(backend = %b.name, error = %e.etype().as_str(), "cannot connect to backend");
        }
        // Nothing was sent: any call may go to another backend.
        let replayable = replayable_now(session, ctx);
        let after = self
            .state
            .selector
            .after_connect_error(ctx, connect_outcome(&e), replayable);
        retry_as_decided(&mut e, after, ctx);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let code = if final_response_written(session) {
            // Headers are out: nothing more can be said; the connection is cut.
            0
        } else {
            match self.error_for(e, ctx) {
                Some(err) => {
                    let err = self.traced_answer(ctx, &err).unwrap_or(err);
                    if respond(session, &err, ctx.continue_sent).await.is_err() {
                        tracing::debug!("could not write the error response");
                    }
                    err.status
                }
                None => 0,
            }
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn request_summary(&self, session: &Session, _ctx: &Self::CTX) -> String {
        // Never the query string: it may carry a subscription key.
        let req = session.req_header();
        format!("{} {}", req.method, req.uri.path())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<Duration>> {
        if ctx.realtime.is_some() {
            self.realtime_frames(body, ctx)?;
            return Ok(None);
        }
        if let (Some(api), Some(b)) = (ctx.api, body.as_ref()) {
            self.state.apis[api].pipeline.response_chunk(ctx, b);
            if let Some(t) = ctx.tally.as_mut() {
                t.feed(b);
            }
            if let Some(call) = ctx.owned.as_mut()
                && let Some(s) = call.id_scanner.as_mut()
                && s.object_id().is_none()
            {
                s.feed(b);
            }
        }
        if let Some(filter) = ctx.usage_filter.as_mut() {
            // The usage chunk Sluice asked for is not the client's.
            let chunk = body.take().unwrap_or_default();
            let mut out = filter.feed(chunk);
            if end_of_stream {
                let rest = filter.finish();
                if !rest.is_empty() {
                    let mut all = BytesMut::with_capacity(out.len() + rest.len());
                    all.extend_from_slice(&out);
                    all.extend_from_slice(&rest);
                    out = all.freeze();
                }
            }
            *body = Some(out);
        }
        Ok(None)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        self.state.selector.finish(ctx);
        if let (Some(rt), Some(api)) = (ctx.realtime.as_ref(), ctx.api) {
            let name = self.state.api_names[api].as_str();
            self.state.websockets_open.with_label_values(&[name]).dec();
            let end = if rt.closed_by_gateway {
                "token_limit"
            } else {
                "closed"
            };
            self.state
                .websocket_sessions
                .with_label_values(&[name, end])
                .inc();
        }
        if let Some(api) = ctx.api {
            let backend = ctx.backend.map(|i| self.state.backends[i].name.as_str());
            self.state.apis[api]
                .pipeline
                .finish(ctx, &self.state.shared, backend)
                .await;
            // An incomplete response (it hit max_output_tokens, say) is an
            // ordinary end, not a failure.
            let failure = ctx
                .usage_scanner
                .as_ref()
                .and_then(|s| s.failure())
                .filter(|f| f.kind != sluice_tokens::StreamFailureKind::Incomplete);
            if let Some(failure) = failure {
                let kind = match failure.kind {
                    sluice_tokens::StreamFailureKind::Failed => "failed",
                    _ => "error",
                };
                let code = failure.code.clone();
                self.state
                    .stream_failures
                    .with_label_values(&[
                        self.state.api_names[api].as_str(),
                        backend.unwrap_or(""),
                        kind,
                    ])
                    .inc();
                ctx.trace(sluice_trace::Section::Outbound, "stream-failure", || {
                    sluice_trace::record::Val::obj([
                        (
                            "message",
                            "The backend reported a failure inside the stream, after its 200."
                                .into(),
                        ),
                        ("kind", kind.into()),
                        ("code", sluice_trace::record::Val::from(code)),
                    ])
                });
            }
        }
        self.settle_owned(ctx).await;
        let status = session
            .response_written()
            .filter(|r| {
                !r.status.is_informational() || r.status == http::StatusCode::SWITCHING_PROTOCOLS
            })
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        self.end_trace(session, ctx, status);
        tracing::debug!(
            target: "sluice::access",
            method = %session.req_header().method,
            path = session.req_header().uri.path(),
            status,
            backend = ctx.backend.map(|i| self.state.backends[i].name.as_str()),
            subscription = ctx.subscription.as_ref().map(|s| &*s.name),
            elapsed_ms = ctx.started.elapsed().as_secs_f64() * 1000.0,
            error = e.map(|e| e.etype().as_str()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn head(pairs: &[(&str, &[u8])]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn head_facts_read_the_first_value_of_each_name_as_get_does() {
        assert_eq!(HeadFacts::read(&head(&[])), HeadFacts::default());
        let f = HeadFacts::read(&head(&[
            ("host", b"gw"),
            ("Content-Type", b"application/json; charset=utf-8"),
            ("content-length", b" 42 "),
            ("content-length", b"7"),
            ("expect", b"100-Continue"),
            ("api-key", b"k"),
        ]));
        assert_eq!(
            f,
            HeadFacts {
                content_length: Some(42),
                content_type: Some(ContentType::Json),
                expect_continue: true,
                ..HeadFacts::default()
            }
        );
        let f = HeadFacts::read(&head(&[
            ("transfer-encoding", b"gzip, Chunked"),
            ("transfer-encoding", b"identity"),
            ("content-type", b"multipart/form-data; boundary=\"abc\""),
            ("content-type", b"application/json"),
            ("upgrade", b"websocket"),
            ("expect", b"something-else"),
            ("content-length", b"x"),
        ]));
        assert_eq!(
            f,
            HeadFacts {
                content_length: None,
                transfer_encoding: true,
                chunked: true,
                content_type: Some(ContentType::Multipart("abc".into())),
                expect_continue: false,
                upgrade: true,
            }
        );
        // Names of the same lengths as the five, with values that would
        // read as theirs: none of them is taken for one of the five.
        let f = HeadFacts::read(&head(&[
            ("accept-charset", b"5"),
            ("if-modified-since", b"chunked"),
            ("x-request-id", b"application/json"),
            ("cookie", b"100-continue"),
            ("api-key", b"websocket"),
        ]));
        assert_eq!(f, HeadFacts::default());
        // Values of one name sent apart still come first value first.
        let f = HeadFacts::read(&head(&[
            ("expect", b"100-continue"),
            ("content-length", b"42"),
            ("host", b"gw"),
            ("expect", b"other"),
            ("content-length", b"7"),
        ]));
        assert_eq!(f.content_length, Some(42));
        assert!(f.expect_continue);
        // A coding that is not text, a multipart type without a boundary,
        // a type that is neither: present, but not chunked, not a form.
        let f = HeadFacts::read(&head(&[
            ("transfer-encoding", b"chunked\xff"),
            ("content-type", b"multipart/form-data"),
        ]));
        assert!(f.transfer_encoding && !f.chunked);
        assert_eq!(f.content_type, Some(ContentType::Other));
        let f = HeadFacts::read(&head(&[
            ("content-type", b"text/plain"),
            ("x-json", b"json"),
        ]));
        assert_eq!(f.content_type, Some(ContentType::Other));
        let f = HeadFacts::read(&head(&[("content-type", b"caf\xc3\xa9/json")]));
        assert_eq!(f.content_type, None, "not visible ASCII: not read");
    }

    #[test]
    fn only_chat_completions_and_embeddings_are_hot() {
        use sluice_tokens::Operation::*;
        for op in [ChatCompletions, Completions, Embeddings] {
            assert!(is_hot(op), "{op:?}");
        }
        for op in [Responses, Other] {
            assert!(!is_hot(op), "{op:?}");
        }
    }

    #[test]
    fn only_a_chat_that_asks_to_be_stored_is_noted() {
        // Each body as the body step reads it, and as a body not read
        // before routing is (its own look).
        let tops = |body: &str| [BodyTop::read(body.as_bytes()), BodyTop::default()];
        for body in [
            r#"{"messages":[],"store":true}"#,
            r#"{"store" : true, "messages":[]}"#,
            r#"{"stream":false,"store":true}"#,
            // A key the walk leaves to the full parser.
            "{\"caf\u{e9}\":1,\"store\":true}",
        ] {
            for top in tops(body) {
                let mut c = ctx();
                note_stored_chat(&mut c, body.as_bytes(), &top);
                assert!(c.owned.as_ref().is_some_and(|o| o.creates), "{body}");
            }
        }
        for body in [
            r#"{"messages":[],"store":false}"#,
            r#"{"messages":[{"role":"user","content":"store"}]}"#,
            r#"{"messages":[]}"#,
            r#"{"stream":true,"store":true,"store":true}"#,
            r#"{"stream":true,"store":"true"}"#,
        ] {
            for top in tops(body) {
                let mut c = ctx();
                note_stored_chat(&mut c, body.as_bytes(), &top);
                assert!(c.owned.is_none(), "{body}");
            }
        }
    }

    #[test]
    fn content_types_are_sorted_as_the_body_step_needs() {
        for c in [
            "multipart/form-data; boundary=x",
            "Multipart/Form-Data;boundary=x",
            "  multipart/mixed",
            "multipart/",
        ] {
            assert!(is_multipart(c), "{c}");
        }
        for c in ["multipart", "application/json", "", "text/multipart/x"] {
            assert!(!is_multipart(c), "{c}");
        }
        for c in [
            "application/json",
            "application/JSON; charset=utf-8",
            "application/merge-patch+json",
            "json",
            "text/jjson",
        ] {
            assert!(mentions_json(c.as_bytes()), "{c}");
        }
        for c in ["text/plain", "", "j", "jso", "application/jso n", "jjj"] {
            assert!(!mentions_json(c.as_bytes()), "{c}");
        }
        // Whatever the old window search said, this says.
        for c in ["x-json", "ajsonb", "JsOn", "js", "nosj", "j;json"] {
            let old = c
                .as_bytes()
                .windows(4)
                .any(|w| w.eq_ignore_ascii_case(b"json"));
            assert_eq!(mentions_json(c.as_bytes()), old, "{c}");
        }
    }

    #[test]
    fn content_lengths_are_read_as_the_text_parser_reads_them() {
        let old = |v: &[u8]| -> Option<u64> {
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse().ok())
        };
        let mut cases: Vec<Vec<u8>> = [
            "0",
            "45",
            " 45 ",
            "\t7",
            "+45",
            "-1",
            "",
            " ",
            "4 5",
            "0045",
            "18446744073709551615",
            "18446744073709551616",
            "9999999999999999999",
            "99999999999999999999",
            "1e3",
            "0x10",
            "٣",
        ]
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
        cases.push(b"\xff12".to_vec());
        for n in [1u64, 9, 10, 65_536, u64::MAX / 10, u64::MAX] {
            cases.push(n.to_string().into_bytes());
        }
        for c in &cases {
            assert_eq!(parse_length(c), old(c), "{:?}", String::from_utf8_lossy(c));
        }
    }

    #[test]
    fn routing_headers_are_read_as_header_map_get_reads_them() {
        let mut h = http::HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert("x-ratelimit-remaining-tokens", "4500".parse().unwrap());
        h.append("x-ratelimit-remaining-tokens", "1".parse().unwrap());
        h.insert(
            "x-ratelimit-reset-tokens",
            http::HeaderValue::from_bytes(b"\xff6s").unwrap(),
        );
        h.append("x-ratelimit-reset-tokens", "6s".parse().unwrap());
        h.insert("retry-after", "3".parse().unwrap());
        h.insert("retry-after-msx", "9".parse().unwrap());
        h.insert("x-ratelimit-limit-tokens", "9".parse().unwrap());
        h.insert("r", "9".parse().unwrap());
        let read = RoutingHeaders::read(&h);
        for name in ROUTING_HEADERS {
            let want = h.get(name).and_then(|v| v.to_str().ok());
            assert_eq!(read.get(name), want, "{name}");
        }
        assert_eq!(read.get("x-ratelimit-remaining-tokens"), Some("4500"));
        assert_eq!(read.get("retry-after"), Some("3"));
        assert_eq!(
            read.get("x-ratelimit-reset-tokens"),
            None,
            "first value not text"
        );
        assert_eq!(read.get("retry-after-ms"), None);
        assert_eq!(read.get("content-type"), None, "not a routing header");
        assert_eq!(
            RoutingHeaders::read(&http::HeaderMap::new()).get("retry-after"),
            None
        );
    }

    #[test]
    fn every_routing_header_is_read_beside_names_of_its_length() {
        let mut h = http::HeaderMap::new();
        for (i, name) in ROUTING_HEADERS.iter().enumerate() {
            h.insert(*name, http::HeaderValue::from(i));
            // Names of the same length that are not routing headers.
            let decoy = format!("z{}", &name[1..]);
            h.insert(
                http::HeaderName::from_bytes(decoy.as_bytes()).unwrap(),
                http::HeaderValue::from_static("decoy"),
            );
        }
        h.insert("x-ms-region", "East US".parse().unwrap());
        let read = RoutingHeaders::read(&h);
        for (i, name) in ROUTING_HEADERS.iter().enumerate() {
            assert_eq!(read.get(name), Some(i.to_string().as_str()), "{name}");
        }
    }

    fn gateway() -> Gateway {
        let yaml = "backends: [{name: east, url: 'http://127.0.0.1:1'}]\n\
                    apis: [{name: a, path: /openai, backends: [east], max_request_body_bytes: 100}]\n";
        let cfg = sluice_config::load_str(yaml, "t.yaml", &std::env::temp_dir())
            .unwrap_or_else(|e| panic!("{e}"));
        Gateway::new(GatewayState::new(&cfg, &HashMap::new()).unwrap())
    }

    fn ctx() -> RequestContext {
        RequestContext {
            api: Some(0),
            backend: Some(0),
            ..RequestContext::default()
        }
    }

    #[test]
    fn proxy_errors_map_to_apim_shaped_statuses() {
        let g = gateway();
        let c = ctx();
        let status = |e: Box<Error>| {
            g.error_for(&e, &c)
                .map(|x| (x.status, x.message.into_owned()))
        };
        let (s, m) = status(Error::new_up(ErrorType::ConnectRefused)).unwrap();
        assert_eq!(s, 502);
        assert!(m.contains("backend 'east'"), "{m}");
        assert_eq!(
            status(Error::new_up(ErrorType::ConnectionClosed))
                .unwrap()
                .0,
            502
        );
        assert_eq!(
            status(Error::new_up(ErrorType::TLSHandshakeFailure))
                .unwrap()
                .0,
            502
        );
        assert_eq!(
            status(Error::new_up(ErrorType::ConnectTimedout)).unwrap().0,
            504
        );
        assert_eq!(
            status(Error::new_up(ErrorType::ReadTimedout)).unwrap().0,
            504
        );
        let (s, m) = status(status_error(413, "x")).unwrap();
        assert_eq!(
            (s, m.as_str()),
            (413, "Request body is too large. The limit is 100 bytes.")
        );
        assert_eq!(
            status(Error::new_down(ErrorType::InvalidHTTPHeader))
                .unwrap()
                .0,
            400
        );
        assert_eq!(
            status(Error::new_in(ErrorType::InternalError)).unwrap().0,
            500
        );
        // A client that went away gets nothing.
        assert!(status(Error::new_down(ErrorType::ConnectionClosed)).is_none());
        assert!(status(Error::new_down(ErrorType::ReadTimedout)).is_none());
    }

    #[test]
    fn hop_values_are_the_address_and_follow_a_change_of_address() {
        let a: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(hop_value(a), "10.1.2.3");
        assert_eq!(hop_value(a), "10.1.2.3");
        assert_eq!(hop_value(b), "2001:db8::1");
        assert_eq!(hop_value(a), "10.1.2.3");
    }

    #[test]
    fn forwarded_hops_with_and_without_ports() {
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        assert_eq!(parse_hop(" 203.0.113.7 "), ip("203.0.113.7"));
        assert_eq!(parse_hop("203.0.113.7:41234"), ip("203.0.113.7"));
        assert_eq!(parse_hop("2001:db8::1"), ip("2001:db8::1"));
        assert_eq!(parse_hop("[2001:db8::1]:443"), ip("2001:db8::1"));
        assert_eq!(parse_hop("[2001:db8::1]"), ip("2001:db8::1"));
        assert_eq!(parse_hop("unknown"), None);
        assert_eq!(parse_hop(""), None);
        assert_eq!(parse_hop("[203.0.113.7"), None);
    }
}
