//! Realtime sessions over WebSocket.
//!
//! `GET /openai/v1/realtime?model=<deployment>` speaks the GA event names
//! (`response.output_text.delta`, `response.output_audio.delta`, ...);
//! `GET /openai/realtime?api-version=...&deployment=<deployment>` speaks the preview's
//! (`response.text.delta`, `response.audio.delta`, ...). Either path also takes the other's
//! parameter name. The key may come as the `api-key` header, `Authorization: Bearer`, or an
//! `api-key` query parameter (the browser form); the handshake is answered after the usual
//! fault injection, so an injected fault answers in place of the 101.
//!
//! A session is a small state machine: `session.update` merges into the session object,
//! `conversation.item.create` and `input_audio_buffer.*` add to the conversation, and
//! `response.create` streams one assistant message (text deltas always, audio and transcript
//! deltas too when the output modalities include `audio`) ending in `response.done` with
//! token usage. There is no voice activity detection: a response starts only on
//! `response.create`. Text is counted with the tokenizer the rest of the simulator uses; audio
//! counts one token per 100 ms in (24 kHz PCM16) and one per 50 ms delta out.
//!
//! Test hooks: `response.sim_deltas` in `response.create` sets the number of text deltas; the
//! client event `{"type":"sim.pad","bytes":N}` makes the server send one audio delta event
//! with about `N` characters of base64, and `{"type":"sim.close","code":C,"reason":R}` makes
//! the server close the session with that code (default 1000).
//!
//! Every server event is a JSON object whose first key is `"type"`, then a unique `event_id`.
//! Unknown or malformed client events get an `error` event; the session stays open. It ends
//! when the client closes, after 10 minutes without a client message, or when the simulator
//! shuts down (close code 1001). At most 10,000 sessions run per region by default.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use sluice_base::{Clock, SystemClock};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::debug;

use crate::body::SimBody;
use crate::encode;
use crate::responses::plan_output;
use crate::server::{
    STREAM_FAIL_MESSAGE, Shared, StreamFail, azure_error, deployment_settings, query_param, stopped,
};
use crate::store::new_id;
use crate::synth;

/// Default bound on concurrent sessions per region.
pub(crate) const DEFAULT_MAX_SESSIONS: usize = 10_000;
/// A session without client messages for this long is closed.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Tokens of a response when neither `max_output_tokens` nor `sim_deltas` says otherwise.
const DEFAULT_OUTPUT_TOKENS: u64 = 4;
/// Most deltas `sim_deltas` may ask for.
const MAX_SIM_DELTAS: u64 = 100_000;
/// Largest `sim.pad` payload: below tungstenite's default 16 MiB frame limit for clients.
const MAX_PAD_BYTES: u64 = 16_000_000;
/// Conversation items kept per session (the oldest are forgotten first).
const MAX_ITEMS: usize = 1_000;
/// PCM16 samples in one output audio delta: 50 ms at 24 kHz.
const AUDIO_DELTA_SAMPLES: usize = 1_200;
/// Input audio bytes per audio token: 100 ms of 24 kHz PCM16.
const INPUT_AUDIO_BYTES_PER_TOKEN: usize = 4_800;
/// How long a closing session waits for the client's Close reply.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Text deltas sent before an `x-sim-stream-fail` failure.
const DELTAS_BEFORE_FAILURE: usize = 2;

/// Which event names a session speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `/openai/v1/realtime`.
    Ga,
    /// `/openai/realtime?api-version=...`.
    Preview,
}

impl Dialect {
    fn pick(self, ga: &'static str, preview: &'static str) -> &'static str {
        match self {
            Dialect::Ga => ga,
            Dialect::Preview => preview,
        }
    }

    fn text_delta(self) -> &'static str {
        self.pick("response.output_text.delta", "response.text.delta")
    }

    fn text_done(self) -> &'static str {
        self.pick("response.output_text.done", "response.text.done")
    }

    fn audio_delta(self) -> &'static str {
        self.pick("response.output_audio.delta", "response.audio.delta")
    }

    fn audio_done(self) -> &'static str {
        self.pick("response.output_audio.done", "response.audio.done")
    }

    fn transcript_delta(self) -> &'static str {
        self.pick(
            "response.output_audio_transcript.delta",
            "response.audio_transcript.delta",
        )
    }

    fn transcript_done(self) -> &'static str {
        self.pick(
            "response.output_audio_transcript.done",
            "response.audio_transcript.done",
        )
    }

    fn text_part(self) -> &'static str {
        self.pick("output_text", "text")
    }

    fn audio_part(self) -> &'static str {
        self.pick("output_audio", "audio")
    }

    /// The session (and response) field listing the output modalities.
    fn modalities_key(self) -> &'static str {
        self.pick("output_modalities", "modalities")
    }

    /// The session field capping a response's output tokens.
    fn max_tokens_key(self) -> &'static str {
        self.pick("max_output_tokens", "max_response_output_tokens")
    }
}

/// One place in the region's bound on concurrent sessions, given back when dropped.
pub(crate) struct SessionSlot {
    shared: Arc<Shared>,
}

impl SessionSlot {
    fn acquire(shared: &Arc<Shared>) -> Option<SessionSlot> {
        let max = shared.realtime_limit.load(Ordering::SeqCst);
        shared
            .realtime_active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        shared.realtime_total.fetch_add(1, Ordering::SeqCst);
        Some(SessionSlot {
            shared: shared.clone(),
        })
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.shared.realtime_active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A query parameter, percent-decoded.
fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    let raw = query_param(query, key)?;
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|v| v.into_owned())
}

/// Whether the `api-key` query parameter carries `key` (the browser form of the key).
pub(crate) fn query_key_matches(query: Option<&str>, key: &str) -> bool {
    query_value(query, "api-key")
        .is_some_and(|given| crate::server::constant_time_eq(given.as_bytes(), key.as_bytes()))
}

/// Whether a comma-separated header lists `token` (ASCII case-insensitive).
fn header_has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

/// The `Sec-WebSocket-Key` of a valid upgrade request, or the 400 answer.
fn websocket_key(headers: &HeaderMap) -> Result<&HeaderValue, Box<Response<SimBody>>> {
    if !header_has_token(headers, UPGRADE, "websocket")
        || !header_has_token(headers, CONNECTION, "upgrade")
    {
        return Err(Box::new(crate::server::bad_request(
            "The realtime API needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket).",
        )));
    }
    if headers
        .get(SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut resp =
            crate::server::bad_request("Unsupported WebSocket version; expected version 13.");
        resp.headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return Err(Box::new(resp));
    }
    let key = headers.get(SEC_WEBSOCKET_KEY);
    let valid = key.is_some_and(|k| {
        base64::engine::general_purpose::STANDARD
            .decode(k.as_bytes())
            .is_ok_and(|raw| raw.len() == 16)
    });
    match key {
        Some(k) if valid => Ok(k),
        _ => Err(Box::new(crate::server::bad_request(
            "The Sec-WebSocket-Key header is missing or not 16 bytes of base64.",
        ))),
    }
}

/// The subprotocol to answer: `realtime` when offered, else none. (Offered tokens carrying
/// a key, `openai-insecure-api-key.*`, are never echoed.)
fn chosen_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    header_has_token(headers, SEC_WEBSOCKET_PROTOCOL, "realtime")
        .then(|| HeaderValue::from_static("realtime"))
}

/// Answer a realtime upgrade request: 101 and a session task, or an Azure-shaped error.
/// Called after the fault and key checks.
pub(crate) fn accept(
    shared: &Arc<Shared>,
    ga: bool,
    parts: &Parts,
    on_upgrade: Option<OnUpgrade>,
    stream_fail: Option<StreamFail>,
) -> Response<SimBody> {
    let dialect = if ga { Dialect::Ga } else { Dialect::Preview };
    let query = parts.uri.query();
    let (name, other) = match dialect {
        Dialect::Ga => ("model", "deployment"),
        Dialect::Preview => ("deployment", "model"),
    };
    let deployment = query_value(query, name)
        .filter(|d| !d.is_empty())
        .or_else(|| query_value(query, other).filter(|d| !d.is_empty()));
    let Some(deployment) = deployment else {
        return crate::server::bad_request(&format!("Missing required query parameter: '{name}'."));
    };
    let key = match websocket_key(&parts.headers) {
        Ok(k) => k,
        Err(resp) => return *resp,
    };
    let Some(on_upgrade) = on_upgrade else {
        return crate::server::bad_request("This connection cannot be upgraded.");
    };
    let Some(slot) = SessionSlot::acquire(shared) else {
        let limit = shared.realtime_limit.load(Ordering::SeqCst);
        let mut resp = azure_error(
            StatusCode::TOO_MANY_REQUESTS,
            "429",
            &format!(
                "Too many concurrent realtime sessions in this region (at most {limit}). \
                 Please retry after 1 second."
            ),
        );
        resp.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        resp.headers_mut()
            .insert("retry-after-ms", HeaderValue::from_static("1000"));
        return resp;
    };
    let session = Session::new(shared, dialect, deployment, stream_fail);
    debug!(region = %shared.cfg.name, session = %session.id, ?dialect, "realtime session accepted");
    let task_shared = shared.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => run(task_shared, upgraded, session, slot).await,
            Err(e) => debug!(error = %e, "realtime upgrade failed"),
        }
    });

    let mut resp = Response::new(SimBody::full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = chosen_protocol(&parts.headers) {
        h.insert(SEC_WEBSOCKET_PROTOCOL, p);
    }
    // Compression is never negotiated here; the offer is echoed (as a test
    // hook) so a test can see whether a gateway passed one on.
    if let Some(offer) = parts.headers.get(http::header::SEC_WEBSOCKET_EXTENSIONS) {
        h.insert("x-sim-offered-extensions", offer.clone());
    }
    if let Some(offer) = parts.headers.get(SEC_WEBSOCKET_PROTOCOL) {
        h.insert("x-sim-offered-protocols", offer.clone());
    }
    resp
}

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Why a session loop stopped.
#[derive(Debug)]
enum End {
    /// The client closed (or went away).
    Peer,
    Idle,
    Shutdown,
    /// A simulated failure (`x-sim-stream-fail: error`): close with 1011.
    Failed,
    /// The client asked for a server-side close (`sim.close`).
    Asked(CloseCode, String),
    Transport(WsError),
}

impl From<WsError> for End {
    fn from(e: WsError) -> Self {
        match e {
            WsError::ConnectionClosed | WsError::AlreadyClosed => End::Peer,
            e => End::Transport(e),
        }
    }
}

async fn run(shared: Arc<Shared>, upgraded: Upgraded, mut session: Session, _slot: SessionSlot) {
    // Small buffers: a region may hold thousands of sessions.
    let config = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024);
    let mut ws =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let mut shutdown = shared.shutdown_signal();
    let end = session.serve(&mut ws, &mut shutdown).await;
    let (code, reason) = match end {
        End::Peer => {
            debug!(session = %session.id, "realtime session closed by the client");
            return;
        }
        End::Transport(e) => {
            debug!(session = %session.id, error = %e, "realtime session transport error");
            return;
        }
        End::Idle => (CloseCode::Normal, "idle timeout".to_string()),
        End::Shutdown => (CloseCode::Away, "server shutting down".to_string()),
        End::Failed => (CloseCode::Error, "simulated failure".to_string()),
        End::Asked(code, reason) => (code, reason),
    };
    debug!(session = %session.id, %reason, "realtime session closed by the server");
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    if ws.close(Some(frame)).await.is_ok() {
        // Wait (briefly) for the client's Close, which completes the closing handshake.
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
}

/// One item of the conversation, as far as counting goes.
#[derive(Debug)]
struct Item {
    id: String,
    role: String,
    text: String,
    audio_bytes: usize,
}

/// The state of one session.
#[derive(Debug)]
struct Session {
    dialect: Dialect,
    id: String,
    deployment: String,
    region: String,
    conversation_id: String,
    /// The session object as `session.created` / `session.updated` show it.
    config: Value,
    items: VecDeque<Item>,
    /// Bytes appended to the input audio buffer since the last commit or clear.
    audio_buffer: usize,
    event_prefix: String,
    events: u64,
    latency: crate::Latency,
    stream_fail: Option<StreamFail>,
}

/// An `error` event to send: `(code, message, param)`.
type Invalid = (&'static str, String, Option<String>);

fn invalid(code: &'static str, message: impl Into<String>, param: Option<&str>) -> Invalid {
    (code, message.into(), param.map(str::to_string))
}

/// Fields of a client event (everything but `type` and `event_id`).
type Fields = Map<String, Value>;

impl Session {
    fn new(
        shared: &Shared,
        dialect: Dialect,
        deployment: String,
        stream_fail: Option<StreamFail>,
    ) -> Session {
        let (model, _) = deployment_settings(&shared.cfg, &deployment);
        let id = format!("sess_{}", synth::random_alnum(22));
        let expires_at = SystemClock.unix_now().as_secs() + 30 * 60;
        let config = match dialect {
            Dialect::Ga => json!({
                "type": "realtime",
                "object": "realtime.session",
                "id": id,
                "model": model,
                "output_modalities": ["audio"],
                "instructions": "",
                "audio": {
                    "input": {
                        "format": { "type": "audio/pcm", "rate": 24_000 },
                        "transcription": null,
                        "noise_reduction": null,
                        "turn_detection": null,
                    },
                    "output": {
                        "format": { "type": "audio/pcm", "rate": 24_000 },
                        "voice": "alloy",
                        "speed": 1.0,
                    },
                },
                "tools": [],
                "tool_choice": "auto",
                "max_output_tokens": "inf",
                "tracing": null,
                "truncation": "auto",
                "prompt": null,
                "include": null,
                "expires_at": expires_at,
            }),
            Dialect::Preview => json!({
                "object": "realtime.session",
                "id": id,
                "model": model,
                "modalities": ["text", "audio"],
                "instructions": "",
                "voice": "alloy",
                "input_audio_format": "pcm16",
                "output_audio_format": "pcm16",
                "input_audio_transcription": null,
                "turn_detection": null,
                "tools": [],
                "tool_choice": "auto",
                "temperature": 0.8,
                "max_response_output_tokens": "inf",
                "expires_at": expires_at,
            }),
        };
        Session {
            dialect,
            id,
            deployment,
            region: shared.cfg.name.clone(),
            conversation_id: format!("conv_{}", synth::random_alnum(22)),
            config,
            items: VecDeque::new(),
            audio_buffer: 0,
            event_prefix: format!("event_{}", synth::random_alnum(12)),
            events: 0,
            latency: shared.cfg.latency,
            stream_fail,
        }
    }

    /// Queue one server event: `{"type":<kind>,"event_id":<unique>,<fields>...}`, with `type`
    /// first whatever the map's key order.
    async fn emit(&mut self, ws: &mut Ws, kind: &str, fields: Value) -> Result<(), End> {
        self.events += 1;
        let text = event_json(
            kind,
            &format!("{}_{}", self.event_prefix, self.events),
            fields,
        );
        ws.feed(Message::text(text)).await?;
        Ok(())
    }

    async fn emit_error(
        &mut self,
        ws: &mut Ws,
        (code, message, param): Invalid,
        client_event_id: Option<&str>,
    ) -> Result<(), End> {
        debug!(session = %self.id, code, %message, "realtime error event");
        self.emit(
            ws,
            "error",
            json!({ "error": {
                "type": "invalid_request_error",
                "code": code,
                "message": message,
                "param": param,
                "event_id": client_event_id,
            } }),
        )
        .await
    }

    async fn serve(&mut self, ws: &mut Ws, shutdown: &mut watch::Receiver<bool>) -> End {
        match self.serve_inner(ws, shutdown).await {
            Ok(()) => End::Peer,
            Err(end) => end,
        }
    }

    async fn serve_inner(
        &mut self,
        ws: &mut Ws,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), End> {
        let session = self.config.clone();
        self.emit(ws, "session.created", json!({ "session": session }))
            .await?;
        ws.flush().await?;
        let idle = tokio::time::sleep(IDLE_TIMEOUT);
        tokio::pin!(idle);
        loop {
            let msg = tokio::select! {
                biased;
                _ = stopped(shutdown) => return Err(End::Shutdown),
                _ = &mut idle => return Err(End::Idle),
                msg = ws.next() => msg,
            };
            idle.as_mut()
                .reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
            match msg {
                None => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(text))) => self.on_event(ws, text.as_str(), shutdown).await?,
                Some(Ok(Message::Binary(_))) => {
                    let e = invalid(
                        "invalid_event",
                        "Binary messages are not supported; send events as JSON text.",
                        None,
                    );
                    self.emit_error(ws, e, None).await?;
                }
                // Pings are answered and a Close is returned by tungstenite itself; the next
                // read then ends the stream.
                Some(Ok(_)) => {}
            }
            ws.flush().await?;
        }
    }

    async fn on_event(
        &mut self,
        ws: &mut Ws,
        text: &str,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), End> {
        let mut fields: Fields = match serde_json::from_str(text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                let e = invalid("invalid_event", "The event must be a JSON object.", None);
                return self.emit_error(ws, e, None).await;
            }
            Err(err) => {
                let e = invalid(
                    "invalid_json",
                    format!("The event is not valid JSON ({err})."),
                    None,
                );
                return self.emit_error(ws, e, None).await;
            }
        };
        let client_event_id = match fields.remove("event_id") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let kind = match fields.remove("type") {
            Some(Value::String(s)) => s,
            _ => {
                let e = invalid(
                    "missing_required_parameter",
                    "Missing required parameter: 'type'.",
                    Some("type"),
                );
                return self.emit_error(ws, e, client_event_id.as_deref()).await;
            }
        };
        let outcome = match kind.as_str() {
            "session.update" => self.session_update(ws, &fields).await,
            "conversation.item.create" => self.item_create(ws, &fields).await,
            "conversation.item.delete" => self.item_delete(ws, &fields).await,
            "input_audio_buffer.append" => self.audio_append(&fields),
            "input_audio_buffer.commit" => self.audio_commit(ws).await,
            "input_audio_buffer.clear" => {
                self.audio_buffer = 0;
                self.emit(ws, "input_audio_buffer.cleared", json!({}))
                    .await
                    .map(Ok)
            }
            "response.create" => self.response_create(ws, &fields, shutdown).await,
            "response.cancel" => Ok(Err(invalid(
                "response_cancel_not_active",
                "Cancellation failed: no active response found.",
                None,
            ))),
            "sim.pad" => self.pad(ws, &fields).await,
            "sim.close" => match close_request(&fields) {
                Ok((code, reason)) => return Err(End::Asked(code, reason)),
                Err(e) => Ok(Err(e)),
            },
            other => Ok(Err(invalid(
                "unknown_event",
                format!("Invalid value: '{other}'. The event type is not supported."),
                Some("type"),
            ))),
        };
        match outcome? {
            Ok(()) => Ok(()),
            Err(e) => self.emit_error(ws, e, client_event_id.as_deref()).await,
        }
    }

    async fn session_update(
        &mut self,
        ws: &mut Ws,
        fields: &Fields,
    ) -> Result<Result<(), Invalid>, End> {
        let Some(Value::Object(update)) = fields.get("session") else {
            return Ok(Err(invalid(
                "missing_required_parameter",
                "Missing required parameter: 'session' (an object).",
                Some("session"),
            )));
        };
        for key in ["output_modalities", "modalities"] {
            if let Some(v) = update.get(key)
                && modalities(v).is_none()
            {
                return Ok(Err(invalid(
                    "invalid_value",
                    format!("Invalid '{key}': expected an array of 'text' and 'audio'."),
                    Some(&format!("session.{key}")),
                )));
            }
        }
        let mut merged = self.config.clone();
        for (k, v) in update {
            // The session's identity is not the client's to change.
            if matches!(k.as_str(), "id" | "object" | "model" | "expires_at") {
                continue;
            }
            merge(&mut merged[k.as_str()], v);
        }
        self.config = merged;
        let session = self.config.clone();
        self.emit(ws, "session.updated", json!({ "session": session }))
            .await?;
        Ok(Ok(()))
    }

    fn last_item_id(&self) -> Value {
        self.items
            .back()
            .map_or(Value::Null, |i| Value::String(i.id.clone()))
    }

    fn push_item(&mut self, item: Item) {
        if self.items.len() >= MAX_ITEMS {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    async fn item_create(
        &mut self,
        ws: &mut Ws,
        fields: &Fields,
    ) -> Result<Result<(), Invalid>, End> {
        let Some(Value::Object(item)) = fields.get("item") else {
            return Ok(Err(invalid(
                "missing_required_parameter",
                "Missing required parameter: 'item' (an object).",
                Some("item"),
            )));
        };
        let (echo, counted) = match conversation_item(item) {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        let previous = self.last_item_id();
        self.push_item(counted);
        self.emit(
            ws,
            "conversation.item.created",
            json!({ "previous_item_id": previous, "item": echo }),
        )
        .await?;
        Ok(Ok(()))
    }

    async fn item_delete(
        &mut self,
        ws: &mut Ws,
        fields: &Fields,
    ) -> Result<Result<(), Invalid>, End> {
        let Some(id) = fields.get("item_id").and_then(Value::as_str) else {
            return Ok(Err(invalid(
                "missing_required_parameter",
                "Missing required parameter: 'item_id'.",
                Some("item_id"),
            )));
        };
        let Some(pos) = self.items.iter().position(|i| i.id == id) else {
            return Ok(Err(invalid(
                "item_not_found",
                format!("Item with item_id '{id}' not found."),
                Some("item_id"),
            )));
        };
        let item = self.items.remove(pos).map(|i| i.id);
        self.emit(ws, "conversation.item.deleted", json!({ "item_id": item }))
            .await?;
        Ok(Ok(()))
    }

    fn audio_append(&mut self, fields: &Fields) -> Result<Result<(), Invalid>, End> {
        let Some(audio) = fields.get("audio").and_then(Value::as_str) else {
            return Ok(Err(invalid(
                "missing_required_parameter",
                "Missing required parameter: 'audio' (base64).",
                Some("audio"),
            )));
        };
        match base64::engine::general_purpose::STANDARD.decode(audio) {
            Ok(raw) => {
                self.audio_buffer = self.audio_buffer.saturating_add(raw.len());
                Ok(Ok(()))
            }
            Err(_) => Ok(Err(invalid(
                "invalid_value",
                "Invalid 'audio': expected base64-encoded audio.",
                Some("audio"),
            ))),
        }
    }

    async fn audio_commit(&mut self, ws: &mut Ws) -> Result<Result<(), Invalid>, End> {
        if self.audio_buffer == 0 {
            return Ok(Err(invalid(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: the buffer is empty.",
                None,
            )));
        }
        let id = new_id("item_");
        let previous = self.last_item_id();
        let item = json!({
            "id": id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{ "type": "input_audio", "transcript": null }],
        });
        let audio_bytes = std::mem::take(&mut self.audio_buffer);
        self.push_item(Item {
            id: id.clone(),
            role: "user".into(),
            text: String::new(),
            audio_bytes,
        });
        self.emit(
            ws,
            "input_audio_buffer.committed",
            json!({ "previous_item_id": previous, "item_id": id }),
        )
        .await?;
        self.emit(
            ws,
            "conversation.item.created",
            json!({ "previous_item_id": previous, "item": item }),
        )
        .await?;
        Ok(Ok(()))
    }

    /// One audio delta of about `bytes` characters of base64 (zeroed PCM).
    async fn pad(&mut self, ws: &mut Ws, fields: &Fields) -> Result<Result<(), Invalid>, End> {
        let n = match fields.get("bytes").and_then(Value::as_u64) {
            Some(n) if n <= MAX_PAD_BYTES => n,
            _ => {
                return Ok(Err(invalid(
                    "invalid_value",
                    format!("Invalid 'bytes': expected an integer from 0 to {MAX_PAD_BYTES}."),
                    Some("bytes"),
                )));
            }
        };
        // Base64 of zero bytes is all `A`s; round up to whole 4-character groups.
        let delta = "A".repeat((n as usize).div_ceil(4).max(1) * 4);
        let kind = self.dialect.audio_delta();
        self.emit(
            ws,
            kind,
            json!({
                "response_id": "resp_sim_pad",
                "item_id": "item_sim_pad",
                "output_index": 0,
                "content_index": 0,
                "delta": delta,
            }),
        )
        .await?;
        Ok(Ok(()))
    }

    /// Input tokens of the conversation so far: text as the equivalent chat request, audio at
    /// one token per 100 ms.
    fn input_tokens(&self, instructions: &str) -> (u64, u64) {
        let mut messages = Vec::with_capacity(self.items.len() + 1);
        if !instructions.is_empty() {
            messages.push(json!({ "role": "system", "content": instructions }));
        }
        for item in &self.items {
            messages.push(json!({ "role": item.role, "content": item.text }));
        }
        let raw = serde_json::to_vec(&json!({ "messages": messages })).unwrap_or_default();
        let text = sluice_tokens::estimate_request(
            sluice_tokens::Operation::ChatCompletions,
            Some(&self.deployment),
            &raw,
        )
        .prompt_tokens;
        let audio_bytes: usize = self.items.iter().map(|i| i.audio_bytes).sum();
        (
            u64::from(text).max(1),
            audio_bytes.div_ceil(INPUT_AUDIO_BYTES_PER_TOKEN) as u64,
        )
    }

    async fn response_create(
        &mut self,
        ws: &mut Ws,
        fields: &Fields,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Result<(), Invalid>, End> {
        let empty = Map::new();
        let req = match fields.get("response") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(r)) => r,
            Some(_) => {
                return Ok(Err(invalid(
                    "invalid_type",
                    "Invalid type for 'response': expected an object.",
                    Some("response"),
                )));
            }
        };
        let plan = match self.plan_response(req) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        self.stream_response(ws, plan, shutdown).await?;
        Ok(Ok(()))
    }

    fn plan_response(&self, req: &Fields) -> Result<ResponsePlan, Invalid> {
        let d = self.dialect;
        let sim_deltas = match req.get("sim_deltas") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) if (1..=MAX_SIM_DELTAS).contains(&n) => Some(n),
                _ => {
                    return Err(invalid(
                        "invalid_value",
                        format!(
                            "Invalid 'sim_deltas': expected an integer from 1 to {MAX_SIM_DELTAS}."
                        ),
                        Some("response.sim_deltas"),
                    ));
                }
            },
        };
        let max_given = ["max_output_tokens", "max_response_output_tokens"]
            .iter()
            .find_map(|k| req.get(*k).filter(|v| !v.is_null()))
            .or_else(|| self.config.get(d.max_tokens_key()));
        let max_tokens = match max_given {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "inf" => None,
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => Some(n),
                _ => {
                    return Err(invalid(
                        "invalid_value",
                        "Invalid 'max_output_tokens': expected a positive integer or 'inf'.",
                        Some("response.max_output_tokens"),
                    ));
                }
            },
        };
        let mods_value = ["output_modalities", "modalities"]
            .iter()
            .find_map(|k| req.get(*k).filter(|v| !v.is_null()))
            .or_else(|| self.config.get(d.modalities_key()))
            .cloned()
            .unwrap_or_else(|| json!(["text"]));
        let Some(mods) = modalities(&mods_value) else {
            return Err(invalid(
                "invalid_value",
                "Invalid modalities: expected an array of 'text' and 'audio'.",
                Some(&format!("response.{}", d.modalities_key())),
            ));
        };
        let instructions = match req.get("instructions") {
            Some(Value::String(s)) => s.clone(),
            _ => self.config["instructions"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        };
        let out_of_band = req.get("conversation").and_then(Value::as_str) == Some("none");
        let (pieces, text_tokens) = match sim_deltas {
            Some(n) => {
                let pieces: Vec<String> = (0..n)
                    .map(|i| {
                        if i == 0 {
                            synth::word(i).to_string()
                        } else {
                            format!(" {}", synth::word(i))
                        }
                    })
                    .collect();
                (pieces, n)
            }
            None => {
                let budget = max_tokens
                    .unwrap_or(DEFAULT_OUTPUT_TOKENS)
                    .clamp(1, synth::MAX_COMPLETION_TOKENS);
                let output = plan_output(budget, &self.region, &self.deployment);
                (output.pieces, output.tokens)
            }
        };
        let voice = match d {
            Dialect::Ga => self.config["audio"]["output"]["voice"].clone(),
            Dialect::Preview => self.config["voice"].clone(),
        };
        Ok(ResponsePlan {
            id: format!("resp_{}", synth::random_alnum(22)),
            item_id: new_id("item_"),
            pieces,
            text_tokens,
            audio: mods.contains(&"audio"),
            modalities: mods_value,
            max_tokens: max_tokens.map_or_else(|| json!("inf"), Value::from),
            instructions,
            out_of_band,
            voice,
        })
    }

    /// The response object in a given state.
    fn response_object(
        &self,
        plan: &ResponsePlan,
        status: &str,
        output: Value,
        usage: Value,
    ) -> Value {
        let conversation = if plan.out_of_band {
            Value::Null
        } else {
            Value::String(self.conversation_id.clone())
        };
        let mut v = json!({
            "object": "realtime.response",
            "id": plan.id,
            "status": status,
            "status_details": null,
            "output": output,
            "conversation_id": conversation,
            "max_output_tokens": plan.max_tokens,
            "usage": usage,
            "metadata": null,
        });
        v[self.dialect.modalities_key()] = plan.modalities.clone();
        match self.dialect {
            Dialect::Ga => {
                v["audio"] = json!({ "output": {
                    "format": { "type": "audio/pcm", "rate": 24_000 },
                    "voice": plan.voice,
                } });
            }
            Dialect::Preview => {
                v["voice"] = plan.voice.clone();
                v["output_audio_format"] = json!("pcm16");
                v["temperature"] = json!(0.8);
            }
        }
        v
    }

    /// The assistant message item; `text: None` while it is in progress.
    fn message_item(&self, plan: &ResponsePlan, status: &str, text: Option<&str>) -> Value {
        let mut content = Vec::new();
        if let Some(t) = text {
            content.push(json!({ "type": self.dialect.text_part(), "text": t }));
            if plan.audio {
                content.push(json!({ "type": self.dialect.audio_part(), "transcript": t }));
            }
        }
        json!({
            "id": plan.item_id,
            "object": "realtime.item",
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        })
    }

    async fn stream_response(
        &mut self,
        ws: &mut Ws,
        plan: ResponsePlan,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), End> {
        let d = self.dialect;
        let (input_text, input_audio) = self.input_tokens(&plan.instructions);
        let created = self.response_object(&plan, "in_progress", json!([]), Value::Null);
        self.emit(ws, "response.created", json!({ "response": created }))
            .await?;
        let item = self.message_item(&plan, "in_progress", None);
        let ids = json!({ "response_id": plan.id, "item_id": plan.item_id, "output_index": 0 });
        self.emit(
            ws,
            "response.output_item.added",
            json!({ "response_id": plan.id, "output_index": 0, "item": item }),
        )
        .await?;
        let part = |index: u64, v: Value| {
            let mut f = ids.clone();
            f["content_index"] = json!(index);
            f["part"] = v;
            f
        };
        self.emit(
            ws,
            "response.content_part.added",
            part(0, json!({ "type": d.text_part(), "text": "" })),
        )
        .await?;
        if plan.audio {
            self.emit(
                ws,
                "response.content_part.added",
                part(1, json!({ "type": d.audio_part(), "transcript": "" })),
            )
            .await?;
        }
        let with = |index: u64, key: &str, v: Value| {
            let mut f = ids.clone();
            f["content_index"] = json!(index);
            if !key.is_empty() {
                f[key] = v;
            }
            f
        };
        let audio_b64 = plan.audio.then(|| {
            base64::engine::general_purpose::STANDARD.encode(encode::pcm16_tone(
                AUDIO_DELTA_SAMPLES,
                encode::SPEECH_SAMPLE_RATE,
            ))
        });

        let mut text = String::new();
        for (i, piece) in plan.pieces.iter().enumerate() {
            let wait = if i == 0 {
                self.latency
                    .time_to_first_token
                    .saturating_add(self.latency.per_token)
            } else {
                self.latency.per_token
            };
            pause(ws, wait, shutdown).await?;
            if i == DELTAS_BEFORE_FAILURE
                && let Some(fail) = self.stream_fail
            {
                return self
                    .fail(ws, &plan, fail, &text, input_text, input_audio)
                    .await;
            }
            text.push_str(piece);
            self.emit(ws, d.text_delta(), with(0, "delta", json!(piece)))
                .await?;
            if let Some(b64) = &audio_b64 {
                self.emit(ws, d.audio_delta(), with(1, "delta", json!(b64)))
                    .await?;
                self.emit(ws, d.transcript_delta(), with(1, "delta", json!(piece)))
                    .await?;
            }
        }
        self.emit(ws, d.text_done(), with(0, "text", json!(text)))
            .await?;
        self.emit(
            ws,
            "response.content_part.done",
            part(0, json!({ "type": d.text_part(), "text": text })),
        )
        .await?;
        let audio_tokens = if plan.audio {
            self.emit(ws, d.audio_done(), with(1, "", Value::Null))
                .await?;
            self.emit(ws, d.transcript_done(), with(1, "transcript", json!(text)))
                .await?;
            self.emit(
                ws,
                "response.content_part.done",
                part(1, json!({ "type": d.audio_part(), "transcript": text })),
            )
            .await?;
            plan.pieces.len() as u64
        } else {
            0
        };
        let item = self.message_item(&plan, "completed", Some(&text));
        self.emit(
            ws,
            "response.output_item.done",
            json!({ "response_id": plan.id, "output_index": 0, "item": item }),
        )
        .await?;
        let usage = realtime_usage(input_text, input_audio, plan.text_tokens, audio_tokens);
        let done = self.response_object(&plan, "completed", json!([item]), usage);
        self.emit(ws, "response.done", json!({ "response": done }))
            .await?;
        if !plan.out_of_band {
            self.push_item(Item {
                id: plan.item_id.clone(),
                role: "assistant".into(),
                text,
                audio_bytes: 0,
            });
        }
        Ok(())
    }

    /// The `x-sim-stream-fail` ending after a few deltas.
    async fn fail(
        &mut self,
        ws: &mut Ws,
        plan: &ResponsePlan,
        fail: StreamFail,
        partial: &str,
        input_text: u64,
        input_audio: u64,
    ) -> Result<(), End> {
        match fail {
            StreamFail::ResponseFailed => {
                let item = self.message_item(plan, "incomplete", Some(partial));
                let output_tokens = DELTAS_BEFORE_FAILURE as u64;
                let usage = realtime_usage(input_text, input_audio, output_tokens, 0);
                let mut failed = self.response_object(plan, "failed", json!([item]), usage);
                failed["status_details"] = json!({
                    "type": "failed",
                    "error": { "type": "server_error", "code": "server_error", "message": STREAM_FAIL_MESSAGE },
                });
                self.emit(ws, "response.done", json!({ "response": failed }))
                    .await
            }
            StreamFail::Error => {
                self.emit(
                    ws,
                    "error",
                    json!({ "error": {
                        "type": "server_error",
                        "code": "server_error",
                        "message": STREAM_FAIL_MESSAGE,
                        "param": null,
                        "event_id": null,
                    } }),
                )
                .await?;
                ws.flush().await?;
                Err(End::Failed)
            }
        }
    }
}

/// The close a `sim.close` event asks for: `code` (default 1000; one a server may send) and
/// `reason` (default empty, at most 123 bytes as a Close frame allows).
fn close_request(fields: &Fields) -> Result<(CloseCode, String), Invalid> {
    let code = match fields.get("code") {
        None | Some(Value::Null) => CloseCode::Normal,
        Some(v) => match v
            .as_u64()
            .and_then(|c| u16::try_from(c).ok())
            .map(CloseCode::from)
        {
            Some(c) if c.is_allowed() => c,
            _ => {
                return Err(invalid(
                    "invalid_value",
                    "Invalid 'code': expected a WebSocket close code a server may send \
                     (1000-1003, 1007-1014 or 3000-4999).",
                    Some("code"),
                ));
            }
        },
    };
    let reason = match fields.get("reason") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(r)) if r.len() <= 123 => r.clone(),
        Some(_) => {
            return Err(invalid(
                "invalid_value",
                "Invalid 'reason': expected a string of at most 123 bytes.",
                Some("reason"),
            ));
        }
    };
    Ok((code, reason))
}

/// Flush what is queued and wait `d` (unless zero), giving up on shutdown.
async fn pause(ws: &mut Ws, d: Duration, shutdown: &mut watch::Receiver<bool>) -> Result<(), End> {
    if d.is_zero() {
        return Ok(());
    }
    ws.flush().await?;
    tokio::select! {
        biased;
        _ = stopped(shutdown) => Err(End::Shutdown),
        _ = tokio::time::sleep(d) => Ok(()),
    }
}

/// What one `response.create` will send.
#[derive(Debug)]
struct ResponsePlan {
    id: String,
    item_id: String,
    pieces: Vec<String>,
    text_tokens: u64,
    audio: bool,
    modalities: Value,
    max_tokens: Value,
    instructions: String,
    out_of_band: bool,
    voice: Value,
}

/// The usage object of `response.done`.
fn realtime_usage(input_text: u64, input_audio: u64, output_text: u64, output_audio: u64) -> Value {
    let input = input_text + input_audio;
    let output = output_text + output_audio;
    json!({
        "total_tokens": input + output,
        "input_tokens": input,
        "output_tokens": output,
        "input_token_details": {
            "text_tokens": input_text,
            "audio_tokens": input_audio,
            "cached_tokens": 0,
            "cached_tokens_details": { "text_tokens": 0, "audio_tokens": 0 },
        },
        "output_token_details": { "text_tokens": output_text, "audio_tokens": output_audio },
    })
}

/// The modalities listed in `v`, when it is an array of `text` and `audio` only.
fn modalities(v: &Value) -> Option<Vec<&'static str>> {
    let items = v.as_array()?;
    items
        .iter()
        .map(|m| match m.as_str() {
            Some("text") => Some("text"),
            Some("audio") => Some("audio"),
            _ => None,
        })
        .collect()
}

/// Merge `update` into `target`: objects key by key (recursively), anything else replaced.
fn merge(target: &mut Value, update: &Value) {
    match (target, update) {
        (Value::Object(t), Value::Object(u)) => {
            for (k, v) in u {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, u) => *t = u.clone(),
    }
}

/// A client's conversation item checked and completed (id, status, `object`), and what it
/// counts: its text (text parts, transcripts, function arguments and outputs) and audio bytes.
/// Audio payloads are left out of the echo.
fn conversation_item(item: &Fields) -> Result<(Value, Item), Invalid> {
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    let id = match item.get("id") {
        None | Some(Value::Null) => new_id("item_"),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 64 => s.clone(),
        Some(_) => {
            return Err(invalid(
                "invalid_value",
                "Invalid 'item.id': expected a string of 1 to 64 characters.",
                Some("item.id"),
            ));
        }
    };
    let mut echo = item.clone();
    echo.insert("id".into(), json!(id));
    echo.insert("object".into(), json!("realtime.item"));
    echo.insert("type".into(), json!(kind));
    echo.entry("status").or_insert(json!("completed"));
    let mut text = String::new();
    let mut audio_bytes = 0usize;
    let role = match kind {
        "message" => {
            let role = match item.get("role").and_then(Value::as_str) {
                Some(r @ ("user" | "assistant" | "system")) => r.to_string(),
                _ => {
                    return Err(invalid(
                        "invalid_value",
                        "Invalid 'item.role': expected 'user', 'assistant' or 'system'.",
                        Some("item.role"),
                    ));
                }
            };
            let Some(Value::Array(parts)) = item.get("content") else {
                return Err(invalid(
                    "missing_required_parameter",
                    "Missing required parameter: 'item.content' (an array).",
                    Some("item.content"),
                ));
            };
            let mut echoed_parts = Vec::with_capacity(parts.len());
            for (i, part) in parts.iter().enumerate() {
                let Some(obj) = part.as_object() else {
                    return Err(invalid(
                        "invalid_value",
                        format!("Invalid 'item.content[{i}]': expected an object."),
                        Some(&format!("item.content[{i}]")),
                    ));
                };
                for key in ["text", "transcript"] {
                    if let Some(t) = obj.get(key).and_then(Value::as_str) {
                        if !text.is_empty() {
                            text.push(' ');
                        }
                        text.push_str(t);
                    }
                }
                let mut echoed = obj.clone();
                if let Some(audio) = echoed.remove("audio") {
                    let decoded = audio
                        .as_str()
                        .and_then(|a| base64::engine::general_purpose::STANDARD.decode(a).ok());
                    let Some(raw) = decoded else {
                        return Err(invalid(
                            "invalid_value",
                            format!("Invalid 'item.content[{i}].audio': expected base64."),
                            Some(&format!("item.content[{i}].audio")),
                        ));
                    };
                    audio_bytes += raw.len();
                }
                echoed_parts.push(Value::Object(echoed));
            }
            echo.insert("content".into(), Value::Array(echoed_parts));
            role
        }
        "function_call" | "function_call_output" => {
            for key in ["name", "arguments", "output"] {
                if let Some(t) = item.get(key).and_then(Value::as_str) {
                    text.push_str(t);
                }
            }
            if kind == "function_call" {
                "assistant".to_string()
            } else {
                "user".to_string()
            }
        }
        other => {
            return Err(invalid(
                "invalid_value",
                format!(
                    "Invalid 'item.type': '{other}'. Supported values are: 'message', \
                     'function_call' and 'function_call_output'."
                ),
                Some("item.type"),
            ));
        }
    };
    Ok((
        Value::Object(echo),
        Item {
            id,
            role,
            text,
            audio_bytes,
        },
    ))
}

/// `{"type":<kind>,"event_id":<id>, ...fields}`: written by hand so that `type` comes first
/// (serde_json's map may sort keys). `type`/`event_id` inside `fields` are ignored.
fn event_json(kind: &str, event_id: &str, fields: Value) -> String {
    let mut out = String::with_capacity(96);
    out.push_str("{\"type\":");
    out.push_str(&Value::from(kind).to_string());
    out.push_str(",\"event_id\":");
    out.push_str(&Value::from(event_id).to_string());
    if let Value::Object(map) = fields {
        for (k, v) in map {
            if k == "type" || k == "event_id" {
                continue;
            }
            out.push(',');
            out.push_str(&Value::from(k).to_string());
            out.push(':');
            out.push_str(&v.to_string());
        }
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_put_type_first() {
        let e = event_json(
            "session.updated",
            "event_1",
            json!({"a": 1, "type": "x", "event_id": "y", "session": {"id": "s"}}),
        );
        assert!(
            e.starts_with("{\"type\":\"session.updated\",\"event_id\":\"event_1\","),
            "{e}"
        );
        let v: Value = serde_json::from_str(&e).unwrap();
        assert_eq!(
            v,
            json!({"type": "session.updated", "event_id": "event_1", "a": 1, "session": {"id": "s"}})
        );
        assert_eq!(
            event_json("input_audio_buffer.cleared", "e\"2", json!({})),
            "{\"type\":\"input_audio_buffer.cleared\",\"event_id\":\"e\\\"2\"}"
        );
    }

    #[test]
    fn dialect_names() {
        assert_eq!(Dialect::Ga.text_delta(), "response.output_text.delta");
        assert_eq!(Dialect::Preview.text_delta(), "response.text.delta");
        assert_eq!(Dialect::Ga.audio_delta(), "response.output_audio.delta");
        assert_eq!(Dialect::Preview.audio_delta(), "response.audio.delta");
        assert_eq!(
            Dialect::Preview.transcript_delta(),
            "response.audio_transcript.delta"
        );
        assert_eq!(Dialect::Ga.modalities_key(), "output_modalities");
        assert_eq!(
            Dialect::Preview.max_tokens_key(),
            "max_response_output_tokens"
        );
    }

    #[test]
    fn merge_is_deep_for_objects() {
        let mut s = json!({"audio": {"output": {"voice": "alloy", "speed": 1.0}}, "tools": [1]});
        merge(
            &mut s,
            &json!({"audio": {"output": {"voice": "verse"}}, "tools": [], "instructions": "hi"}),
        );
        assert_eq!(
            s,
            json!({"audio": {"output": {"voice": "verse", "speed": 1.0}}, "tools": [], "instructions": "hi"})
        );
    }

    #[test]
    fn modalities_parse() {
        assert_eq!(
            modalities(&json!(["text", "audio"])),
            Some(vec!["text", "audio"])
        );
        assert_eq!(modalities(&json!([])), Some(vec![]));
        assert_eq!(modalities(&json!(["video"])), None);
        assert_eq!(modalities(&json!("text")), None);
    }

    #[test]
    fn conversation_items_are_checked_and_counted() {
        let item = json!({
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "hello"},
                {"type": "input_audio", "audio": "AAAAAAAA", "transcript": "there"},
            ],
        });
        let (echo, counted) = conversation_item(item.as_object().unwrap()).unwrap();
        assert_eq!(counted.text, "hello there");
        assert_eq!(counted.audio_bytes, 6);
        assert_eq!(counted.role, "user");
        assert_eq!(echo["object"], "realtime.item");
        assert_eq!(echo["status"], "completed");
        assert!(echo["id"].as_str().unwrap().starts_with("item_"));
        assert!(echo["content"][1].get("audio").is_none());
        let with_id = json!({"id": "item_mine", "role": "system", "content": []});
        let (echo, _) = conversation_item(with_id.as_object().unwrap()).unwrap();
        assert_eq!(echo["id"], "item_mine");
        assert_eq!(echo["type"], "message");
        let call = json!({"type": "function_call_output", "call_id": "c", "output": "42"});
        let (_, counted) = conversation_item(call.as_object().unwrap()).unwrap();
        assert_eq!(
            (counted.text.as_str(), counted.role.as_str()),
            ("42", "user")
        );
        for bad in [
            json!({"role": "robot", "content": []}),
            json!({"role": "user"}),
            json!({"role": "user", "content": ["x"]}),
            json!({"role": "user", "content": [{"type": "input_audio", "audio": "!!"}]}),
            json!({"type": "image", "role": "user", "content": []}),
            json!({"id": 5, "role": "user", "content": []}),
        ] {
            assert!(
                conversation_item(bad.as_object().unwrap()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn close_requests_parse() {
        let f = |v: Value| close_request(v.as_object().unwrap());
        assert_eq!(f(json!({})).unwrap(), (CloseCode::Normal, String::new()));
        assert_eq!(
            f(json!({"code": 4001, "reason": "bye"})).unwrap(),
            (CloseCode::from(4001), "bye".to_string())
        );
        assert_eq!(f(json!({"code": 1011})).unwrap().0, CloseCode::Error);
        for bad in [
            json!({"code": 1005}),
            json!({"code": 1006}),
            json!({"code": 999}),
            json!({"code": 70000}),
            json!({"code": "x"}),
            json!({"reason": "r".repeat(124)}),
        ] {
            assert!(f(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn usage_adds_up() {
        let u = realtime_usage(10, 3, 4, 2);
        assert_eq!(u["input_tokens"], 13);
        assert_eq!(u["output_tokens"], 6);
        assert_eq!(u["total_tokens"], 19);
        assert_eq!(u["input_token_details"]["audio_tokens"], 3);
        assert_eq!(u["output_token_details"]["text_tokens"], 4);
    }

    #[test]
    fn handshake_headers_are_checked() {
        let mut h = HeaderMap::new();
        assert!(websocket_key(&h).is_err());
        h.insert(UPGRADE, HeaderValue::from_static("WebSocket"));
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(websocket_key(&h).is_err(), "no version");
        h.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        let resp = websocket_key(&h).unwrap_err();
        assert_eq!(resp.headers()[SEC_WEBSOCKET_VERSION], "13");
        h.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        assert!(websocket_key(&h).is_err(), "no key");
        h.insert(SEC_WEBSOCKET_KEY, HeaderValue::from_static("c2hvcnQ="));
        assert!(websocket_key(&h).is_err(), "key too short");
        h.insert(
            SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        let key = websocket_key(&h).unwrap();
        // RFC 6455, section 1.3.
        assert_eq!(
            derive_accept_key(key.as_bytes()),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(chosen_protocol(&h), None);
        h.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("openai-insecure-api-key.k, realtime"),
        );
        assert_eq!(chosen_protocol(&h).unwrap(), "realtime");
    }

    #[test]
    fn query_keys_are_decoded() {
        assert!(query_key_matches(Some("model=m&api-key=a%2Bb"), "a+b"));
        assert!(!query_key_matches(Some("model=m&api-key=nope"), "a+b"));
        assert!(!query_key_matches(None, "a+b"));
        assert_eq!(
            query_value(Some("deployment=gpt%2D4o"), "deployment").as_deref(),
            Some("gpt-4o")
        );
    }
}
