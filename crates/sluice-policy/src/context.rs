//! Per-request state shared by the steps of one request.
//!
//! Policies keep nothing per request in `self`: it all lives here. Each field
//! says which step writes it and which read it.

use std::net::IpAddr;
use std::time::Instant;

use http::HeaderName;
use sluice_auth::Caller;
use sluice_config::Secret;
use sluice_limits::Reservation;
use sluice_tokens::{Operation, RequestEstimate, Usage, UsageScanner};

use crate::stream_tag::StreamProbe;
use crate::subscription::SubscriptionMatch;

/// Counts a request as in flight while it lives (a graceful shutdown waits
/// for the count to reach zero).
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    pub fn new(count: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Tokens reserved by one `token_limit` step, reconciled at the end.
#[derive(Debug, Clone)]
pub struct TokenCharge {
    /// The prompt estimate (0 when the step does not estimate).
    pub estimated: u64,
    /// What was reserved: the prompt estimate plus the completion allowed.
    /// A success whose usage is unknown is charged this.
    pub reserved: u64,
    pub tpm: Option<Reservation>,
    pub quota: Option<Reservation>,
}

/// How the request body is being inspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyMode {
    /// Not decided yet, or the request has no body.
    #[default]
    None,
    /// Read whole before routing (small bodies): pingora's retry buffer
    /// replays it.
    Preread,
    /// Read whole before routing (over 64 KiB, or chunked) and held by the
    /// gateway, which sends it on every attempt itself.
    Held,
    /// Streamed to the backend and scanned as it passes.
    Streamed,
    /// A small body (a declared length up to 64 KiB) that nothing needs
    /// before routing: it passes to the backend as pingora reads it, and
    /// pingora's retry buffer, which holds all of it, replays it on a
    /// failover. It is looked at once, when its end has been read, for its
    /// `stream` flag (and, in a chat completion, `store`).
    Passed,
}

#[derive(Debug)]
pub struct RequestContext {
    /// When the gateway received the request. Written at creation; read for timing.
    pub started: Instant,
    /// Index of the matched API. Written by routing; read by every later step.
    pub api: Option<usize>,
    /// Byte offset in the request path where the part after the API prefix starts.
    /// Written by routing; read when building the upstream path.
    pub rest_offset: usize,
    /// The caller's subscription. Written by the subscription step; read by
    /// limits and metrics (later issues) and logging.
    pub subscription: Option<SubscriptionMatch>,
    /// Written by the body step; read by the body filter and the retry logic.
    pub body_mode: BodyMode,
    /// Bytes of request body seen so far. Written by the body step / body filter.
    pub body_len: u64,
    /// Scans a streamed body for its `stream` field as it passes (O(1) state).
    /// Written and read by the body filter.
    pub body_probe: StreamProbe,
    /// A passed body ([`BodyMode::Passed`]) has been looked at. Written by
    /// the body filter when the body's end is read.
    pub passed_seen: bool,
    /// A passed body is a chat completion's, which may ask to be stored
    /// (the answer's id is then learned for affinity). Written at inbound.
    pub passed_chat: bool,
    /// The request body's `stream` flag. Written by the body step (preread) or at
    /// the end of a streamed body; read by the response step (`x-ms-stream`).
    pub stream: bool,
    /// Index of the backend chosen. Written by backend selection; read by the
    /// upstream request step and error mapping.
    pub backend: Option<usize>,
    /// The client's address. Written at inbound; read by limits and metrics.
    pub client_ip: Option<IpAddr>,
    /// The caller of a valid JWT. Written by `validate_jwt`; read by claim- and
    /// identity-keyed limits and metrics.
    pub caller: Option<Box<Caller>>,
    /// What the request is (chat, completions, embeddings). Written at inbound
    /// when a step needs usage; read by the usage scanner.
    pub operation: Option<Operation>,
    /// The deployment (from the path, or the body's `model`). Written at
    /// inbound; read by metrics and the tokenizer choice.
    pub deployment: Option<String>,
    /// Prompt estimate from a body read before routing. Written at inbound;
    /// read by `token_limit` and the usage scanner.
    pub estimate: Option<RequestEstimate>,
    /// Token reservations to reconcile. Written by `token_limit`; read at finish.
    pub token_charges: Vec<TokenCharge>,
    /// A relayed Realtime (WebSocket) session. Written when the backend
    /// answers the handshake with 101; read by the body filters and at
    /// finish (its responses were charged as they completed).
    pub realtime: Option<Box<crate::realtime::RealtimeSession>>,
    /// The request is a Realtime handshake (a WebSocket upgrade of the
    /// Realtime path). Written at inbound; read when building the backend's
    /// request and when its 101 arrives.
    pub realtime_call: Option<Box<crate::realtime::RealtimeCall>>,
    /// The start of a streamed multipart body, read before routing to find
    /// its `model` field (v1 uploads). Written at inbound; sent ahead of the
    /// rest of the body on each attempt.
    pub body_prefix: Option<bytes::Bytes>,
    /// The attempt under way has not sent `body_prefix` yet. Set for each
    /// attempt; cleared by the body filter once the prefix went out.
    pub prefix_pending: bool,
    /// Headers the policies add to the response (remaining/consumed tokens).
    /// Written at inbound; read by the response step.
    pub response_headers: Vec<(HeaderName, String)>,
    /// Request header values kept for metric dimensions. Written at inbound; read at finish.
    pub metric_headers: Vec<(HeaderName, String)>,
    /// Backend status. Written when the response head arrives; read at finish.
    pub upstream_status: u16,
    /// The backend's `x-ms-region`. Written with the response head; read by metrics.
    pub backend_region: Option<std::sync::Arc<str>>,
    /// Reads usage from the response body. Written at response start and per chunk.
    pub usage_scanner: Option<Box<UsageScanner>>,
    /// The usage of the exchange. Written at finish.
    pub usage: Option<Usage>,
    /// The Entra ID token for the chosen backend. Written by backend
    /// selection (reset on every attempt); read by the upstream request step.
    pub backend_bearer: Option<Secret>,
    /// The credential kind that failed to give a token (for the 503).
    pub identity_failure: Option<&'static str>,
    /// A bounded copy of a body streamed to the backend (over 64 KiB or
    /// chunked), kept when a step needs its prompt estimate; `None` once it
    /// outgrew the cap. Written by the body filter; estimated at its end.
    pub streamed_body_copy: Option<Vec<u8>>,
    /// Ask the backend for an uncompressed answer (usage must be readable).
    /// Written at inbound; read by the upstream request step.
    pub strip_accept_encoding: bool,
    /// The gateway sent `100 Continue` itself (the client then sends its
    /// body). Written by the body step; read when answering early.
    pub continue_sent: bool,
    /// The body streams to the backend and the steps that need it run at its
    /// end. Written at inbound; read (and cleared) by the body filter.
    pub body_steps_deferred: bool,
    /// A policy's refusal decided after forwarding began (a deferred step):
    /// the answer the client gets. Written by the body filter; read by the
    /// error mapping.
    pub refusal: Option<Box<crate::GatewayError>>,
    /// Keeps the request counted as in flight. Written at creation; dropped
    /// with the context.
    pub in_flight: Option<InFlight>,
    /// The pool, the attempts made so far and the next backend planned.
    /// Written by backend selection; read by the proxy and traces.
    pub routing: crate::selection::Routing,
    /// What the request holds of the gateway's body-buffer budget, given
    /// back when the context drops. Written when the body is read.
    pub body_hold: Option<crate::budget::BodyHold>,
    /// What this request did, step by step, when it carries a valid debug
    /// credential (`Apim-Debug-Authorization`); `None` (the usual case)
    /// records nothing. Written by every step that decides something; read
    /// when the exchange ends, to store the trace.
    pub trace: Option<Box<sluice_trace::record::Recorder>>,
    /// The traced request's id (`Apim-Trace-Id`). Written when tracing
    /// starts; read by the response steps and the summary.
    pub trace_id: Option<Box<str>>,
    /// The header that says why a debug credential did not open tracing
    /// (`Apim-Debug-Authorization-Expired` / `-WrongAPI`) and its value.
    /// Written when the credential is checked; read by every response.
    pub trace_note: Option<(&'static str, String)>,
    /// What the traced response's body did as it passed. Written by the
    /// response body step of a traced request; read when the trace is stored.
    pub tally: Option<Box<sluice_trace::record::Tally>>,
    /// The same for a traced request's body streamed to the backend.
    /// Written by the request body step; recorded at the body's end.
    pub request_tally: Option<Box<sluice_trace::record::Tally>>,
    /// The edits this request's body gets on its way to a backend (the v1
    /// `model` renamed per backend, usage asked of a stream); `None` when
    /// it goes as sent. Written before routing; read on every attempt.
    pub edit: Option<Box<crate::body_edit::BodyEdit>>,
    /// The backend-owned object the request names or creates. Written
    /// before routing; read when the answer arrives and at the end.
    pub owned: Option<Box<crate::affinity::OwnedCall>>,
    /// Keeps the usage chunk Sluice asked for (`stream_options`) from the
    /// client. Written when a stream's head arrives; read per chunk.
    pub usage_filter: Option<Box<sluice_tokens::UsageChunkFilter>>,
    /// Sluice added `stream_options.include_usage` to the body it sent.
    /// Written before routing; read when the answer's head arrives.
    pub usage_asked: bool,
}

impl RequestContext {
    /// Record a step of a traced request; `data` is only built when the
    /// request is traced.
    #[inline]
    pub fn trace(
        &mut self,
        section: sluice_trace::Section,
        source: &'static str,
        data: impl FnOnce() -> sluice_trace::record::Val,
    ) {
        if let Some(t) = self.trace.as_mut() {
            t.add(section, source, data());
        }
    }

    /// Who the caller is for limits and metrics: `subscription:<name>`, else
    /// the JWT's `app:<appid/azp>`, else `sub:<subject>`.
    pub fn identity(&self) -> Option<String> {
        if let Some(s) = &self.subscription {
            return Some(format!("subscription:{}", s.name));
        }
        let caller = self.caller.as_ref()?;
        match (&caller.app_id, &caller.subject) {
            (Some(app), _) => Some(format!("app:{app}")),
            (None, Some(sub)) => Some(format!("sub:{sub}")),
            (None, None) => None,
        }
    }
}

impl Default for RequestContext {
    fn default() -> Self {
        RequestContext {
            started: Instant::now(),
            api: None,
            rest_offset: 0,
            subscription: None,
            body_mode: BodyMode::None,
            body_len: 0,
            body_probe: StreamProbe::default(),
            passed_seen: false,
            passed_chat: false,
            stream: false,
            backend: None,
            client_ip: None,
            caller: None,
            operation: None,
            deployment: None,
            estimate: None,
            token_charges: Vec::new(),
            realtime: None,
            realtime_call: None,
            body_prefix: None,
            prefix_pending: false,
            response_headers: Vec::new(),
            metric_headers: Vec::new(),
            upstream_status: 0,
            backend_region: None,
            usage_scanner: None,
            usage: None,
            backend_bearer: None,
            identity_failure: None,
            strip_accept_encoding: false,
            streamed_body_copy: None,
            continue_sent: false,
            body_steps_deferred: false,
            refusal: None,
            in_flight: None,
            routing: crate::selection::Routing::default(),
            body_hold: None,
            trace: None,
            trace_id: None,
            trace_note: None,
            tally: None,
            request_tally: None,
            edit: None,
            owned: None,
            usage_filter: None,
            usage_asked: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_backend_token() {
        let ctx = RequestContext {
            backend_bearer: Some(Secret::new("eyJ-backend-token-sentinel")),
            ..RequestContext::default()
        };
        let printed = format!("{ctx:?}");
        assert!(!printed.contains("sentinel"), "{printed}");
        assert!(
            printed.contains("backend_bearer: Some(<redacted>)"),
            "{printed}"
        );
    }
}
