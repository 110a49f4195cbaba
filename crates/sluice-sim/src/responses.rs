//! The Responses API: `POST .../responses` (JSON or SSE), and the stored responses
//! (`GET`/`DELETE .../responses/{id}`, `GET .../responses/{id}/input_items`).
//!
//! Generation reuses the chat machinery: the same words (one token each), the same latency
//! model, the same per-deployment limiter. The generated text ends with ` from <region>` when
//! the token budget leaves room for it, so a test can tell which region answered.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{Map, Value, json};
use sluice_base::{Clock, SystemClock};
use tokio::sync::mpsc;
use tracing::debug;

use crate::body::SimBody;
use crate::server::{
    STREAM_FAIL_MESSAGE, Shared, StreamFail, add_ratelimit_headers, admit, deployment_settings,
    json_object_body, json_response, lock, oai_error, per_token_total, query_param, sse_response,
    unknown_id,
};
use crate::store::{BoundedStore, ListQuery, list_page, new_id};
use crate::synth;

/// The operation name used in 429 messages, after Azure's naming.
const OPERATION: &str = "Responses_Create";
/// How many earlier responses a `previous_response_id` chain contributes to the prompt.
const MAX_CHAIN: usize = 1_000;

/// A response kept for `GET`, `input_items` and later `previous_response_id`s.
#[derive(Debug)]
pub(crate) struct StoredResponse {
    /// The response object as `GET` returns it (updated when a stream ends).
    object: Value,
    /// The input items, in the order given, each with an `id`.
    input_items: Vec<Value>,
    /// The generated text, the assistant turn seen by a follow-up response.
    output_text: String,
    previous: Option<String>,
}

/// A 400 with the OpenAI fields.
#[derive(Debug)]
struct Invalid {
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
}

impl Invalid {
    fn new(message: impl Into<String>, param: impl Into<String>) -> Self {
        Invalid {
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    fn missing(param: &str) -> Self {
        Invalid {
            message: format!("Missing required parameter: '{param}'."),
            param: Some(param.into()),
            code: Some("missing_required_parameter"),
        }
    }

    fn into_response(self) -> Response<SimBody> {
        oai_error(
            StatusCode::BAD_REQUEST,
            &self.message,
            self.param.as_deref(),
            self.code,
        )
    }
}

/// A validated `POST .../responses` body.
#[derive(Debug)]
struct CreateRequest {
    /// The `model` field: the deployment name.
    deployment: String,
    input_items: Vec<Value>,
    instructions: Option<String>,
    stream: bool,
    previous_response_id: Option<String>,
    store: bool,
    max_output_tokens: Option<u64>,
    /// Request fields echoed into the response object as given.
    echoed: Map<String, Value>,
}

/// Request fields copied into the response object when present (else defaults apply).
const ECHOED: &[&str] = &[
    "metadata",
    "parallel_tool_calls",
    "reasoning",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_p",
    "truncation",
    "user",
];

fn parse_create(body: &Value) -> Result<CreateRequest, Invalid> {
    let deployment = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => return Err(Invalid::missing("model")),
        Some(_) => {
            return Err(Invalid::new(
                "Invalid type for 'model': expected a string.",
                "model",
            ));
        }
    };
    let input_items = match body.get("input") {
        None | Some(Value::Null) => return Err(Invalid::missing("input")),
        Some(input) => normalize_input(input)?,
    };
    let optional_string = |key: &str| match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Invalid::new(
            format!("Invalid type for '{key}': expected a string."),
            key,
        )),
    };
    let optional_bool = |key: &str| match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(Invalid::new(
            format!("Invalid type for '{key}': expected a boolean."),
            key,
        )),
    };
    let max_output_tokens = match body.get("max_output_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            Invalid::new(
                "Invalid value for 'max_output_tokens': expected a non-negative integer.",
                "max_output_tokens",
            )
        })?),
    };
    let echoed = ECHOED
        .iter()
        .filter_map(|k| {
            body.get(*k)
                .filter(|v| !v.is_null())
                .map(|v| ((*k).to_string(), v.clone()))
        })
        .collect();
    Ok(CreateRequest {
        deployment,
        input_items,
        instructions: optional_string("instructions")?,
        stream: optional_bool("stream")?.unwrap_or(false),
        previous_response_id: optional_string("previous_response_id")?,
        store: optional_bool("store")?.unwrap_or(true),
        max_output_tokens,
        echoed,
    })
}

/// `input` as a list of items with ids: a string becomes one user message; messages get their
/// `content` as a list of parts; other item types are kept as given.
fn normalize_input(input: &Value) -> Result<Vec<Value>, Invalid> {
    match input {
        Value::String(s) => Ok(vec![message_item(
            None,
            "user",
            json!([{ "type": "input_text", "text": s }]),
        )]),
        Value::Array(items) if items.is_empty() => Err(Invalid::new(
            "Invalid 'input': expected at least one item.",
            "input",
        )),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| normalize_item(i, item))
            .collect(),
        _ => Err(Invalid::new(
            "Invalid type for 'input': expected a string or an array of input items.",
            "input",
        )),
    }
}

fn normalize_item(i: usize, item: &Value) -> Result<Value, Invalid> {
    let param = format!("input[{i}]");
    let Value::Object(obj) = item else {
        return Err(Invalid::new(
            format!("Invalid type for '{param}': expected an object."),
            param,
        ));
    };
    let id = obj.get("id").and_then(Value::as_str);
    match obj.get("type").and_then(Value::as_str) {
        None | Some("message") => {}
        Some(_) => {
            // function_call_output, item_reference, ...: kept as they are.
            let mut v = item.clone();
            if id.is_none() {
                v["id"] = json!(new_id("item_"));
            }
            return Ok(v);
        }
    }
    let role = match obj.get("role").and_then(Value::as_str) {
        Some(r @ ("user" | "assistant" | "system" | "developer")) => r,
        Some(_) => {
            return Err(Invalid::new(
                format!(
                    "Invalid value for '{param}.role': expected one of 'user', 'assistant', \
                     'system' or 'developer'."
                ),
                format!("{param}.role"),
            ));
        }
        None => return Err(Invalid::missing(&format!("{param}.role"))),
    };
    let content = match obj.get("content") {
        Some(Value::String(s)) => {
            let kind = if role == "assistant" {
                "output_text"
            } else {
                "input_text"
            };
            json!([{ "type": kind, "text": s }])
        }
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                if !part.get("type").is_some_and(Value::is_string) {
                    return Err(Invalid::new(
                        format!(
                            "Invalid '{param}.content[{j}]': expected an object with a 'type'."
                        ),
                        format!("{param}.content[{j}]"),
                    ));
                }
            }
            Value::Array(parts.clone())
        }
        Some(_) => {
            return Err(Invalid::new(
                format!("Invalid type for '{param}.content': expected a string or an array."),
                format!("{param}.content"),
            ));
        }
        None => return Err(Invalid::missing(&format!("{param}.content"))),
    };
    Ok(message_item(id, role, content))
}

fn message_item(id: Option<&str>, role: &str, content: Value) -> Value {
    json!({
        "type": "message",
        "id": id.map_or_else(|| new_id("msg_"), str::to_string),
        "status": "completed",
        "role": role,
        "content": content,
    })
}

/// The chat message an input item counts as: a message by its role and content parts (text
/// by its tokens, images at the fixed image cost), anything else by its JSON text.
fn as_chat_message(item: &Value) -> Value {
    if item["type"] == "message" {
        json!({ "role": item["role"], "content": item["content"] })
    } else {
        json!({ "role": "user", "content": item.to_string() })
    }
}

/// The conversation before a response, oldest first, following `previous_response_id` links
/// through what this region still stores.
fn chain_messages(store: &BoundedStore<StoredResponse>, start: &str) -> Vec<Value> {
    let mut turns: Vec<Vec<Value>> = Vec::new();
    let mut next = Some(start);
    while let Some(id) = next {
        if turns.len() >= MAX_CHAIN {
            break;
        }
        let Some(r) = store.get(id) else { break };
        let mut turn: Vec<Value> = r.input_items.iter().map(as_chat_message).collect();
        if !r.output_text.is_empty() {
            turn.push(json!({ "role": "assistant", "content": r.output_text }));
        }
        turns.push(turn);
        next = r.previous.as_deref();
    }
    turns.into_iter().rev().flatten().collect()
}

/// Input tokens: the instructions, the earlier turns and the input, counted like the
/// equivalent chat request (with the same tokenizer the gateway uses for chat).
fn count_input_tokens(
    deployment: &str,
    instructions: Option<&str>,
    history: Vec<Value>,
    items: &[Value],
) -> u64 {
    let mut messages = Vec::with_capacity(history.len() + items.len() + 1);
    if let Some(i) = instructions {
        messages.push(json!({ "role": "developer", "content": i }));
    }
    messages.extend(history);
    messages.extend(items.iter().map(as_chat_message));
    let raw = serde_json::to_vec(&json!({ "messages": messages })).unwrap_or_default();
    let counted = sluice_tokens::estimate_request(
        sluice_tokens::Operation::ChatCompletions,
        Some(deployment),
        &raw,
    )
    .prompt_tokens;
    u64::from(counted).max(1)
}

/// The generated output: its stream pieces (one per delta) and its token count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Output {
    pub(crate) pieces: Vec<String>,
    pub(crate) tokens: u64,
}

impl Output {
    fn text(&self) -> String {
        self.pieces.concat()
    }
}

/// `budget` tokens of generated words; when the budget has room, the last tokens are
/// ` from <region>` (e.g. `the lock gate from eastus`).
pub(crate) fn plan_output(budget: u64, region: &str, deployment: &str) -> Output {
    let encoding = sluice_tokens::encoding_for_model(deployment);
    let suffix_tokens = if region.is_empty() {
        0
    } else {
        u64::from(sluice_tokens::count_text(
            encoding,
            &format!(" from {region}"),
        ))
    };
    let (words, suffix) = if suffix_tokens > 0 && budget > suffix_tokens {
        (budget - suffix_tokens, true)
    } else {
        (budget, false)
    };
    let mut pieces: Vec<String> = (0..words)
        .map(|i| {
            let w = synth::word(i);
            if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    if suffix {
        pieces.push(" from".to_string());
        pieces.push(format!(" {region}"));
    }
    Output {
        pieces,
        tokens: words + if suffix { suffix_tokens } else { 0 },
    }
}

fn usage(input: u64, output: u64) -> Value {
    json!({
        "input_tokens": input,
        "input_tokens_details": { "cached_tokens": 0 },
        "output_tokens": output,
        "output_tokens_details": { "reasoning_tokens": 0 },
        "total_tokens": input + output,
    })
}

/// What every rendering of one response shares.
#[derive(Debug)]
struct Meta {
    id: String,
    msg_id: String,
    created_at: u64,
    model: String,
    previous_response_id: Option<String>,
    instructions: Option<String>,
    max_output_tokens: Option<u64>,
    store: bool,
    echoed: Map<String, Value>,
}

impl Meta {
    /// The response object in a given state.
    fn response(&self, status: &str, output: Vec<Value>, usage: Value, error: Value) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": false,
            "error": error,
            "incomplete_details": null,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": {},
            "model": self.model,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": self.previous_response_id,
            "reasoning": { "effort": null, "summary": null },
            "store": self.store,
            "temperature": 1.0,
            "text": { "format": { "type": "text" } },
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": null,
        });
        for (k, val) in &self.echoed {
            v[k.as_str()] = val.clone();
        }
        v
    }

    /// The assistant message output item; `text: None` gives it no content yet.
    fn message(&self, status: &str, text: Option<&str>) -> Value {
        let content = match text {
            Some(t) => json!([{ "type": "output_text", "text": t, "annotations": [] }]),
            None => json!([]),
        };
        json!({
            "type": "message",
            "id": self.msg_id,
            "status": status,
            "role": "assistant",
            "content": content,
        })
    }

    fn completed(&self, text: &str, input_tokens: u64, output_tokens: u64) -> Value {
        self.response(
            "completed",
            vec![self.message("completed", Some(text))],
            usage(input_tokens, output_tokens),
            Value::Null,
        )
    }

    fn failed(&self, partial_text: &str) -> Value {
        self.response(
            "failed",
            vec![self.message("incomplete", Some(partial_text))],
            Value::Null,
            json!({ "code": "server_error", "message": STREAM_FAIL_MESSAGE }),
        )
    }
}

/// Rough memory use of a stored response, for the store's byte budget.
fn stored_weight(items: &[Value], text_len: usize) -> usize {
    let items: usize = items.iter().map(|v| v.to_string().len()).sum();
    items + 2 * text_len + 2048
}

/// `POST /openai[/v1]/responses`.
pub(crate) async fn create(
    shared: &Arc<Shared>,
    query: Option<&str>,
    bytes: &[u8],
    stream_fail: Option<StreamFail>,
) -> Response<SimBody> {
    let body = match json_object_body(bytes) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let req = match parse_create(&body) {
        Ok(r) => r,
        Err(invalid) => return invalid.into_response(),
    };
    let cfg = &shared.cfg;
    let (model, tpm) = deployment_settings(cfg, &req.deployment);

    let history = match &req.previous_response_id {
        None => Vec::new(),
        Some(prev) => {
            let store = lock(&shared.stores.responses);
            if store.get(prev).is_none() {
                // A 400, as the service answers it (not a 404).
                return oai_error(
                    StatusCode::BAD_REQUEST,
                    &format!("Previous response with id '{prev}' not found."),
                    Some("previous_response_id"),
                    Some("previous_response_not_found"),
                );
            }
            chain_messages(&store, prev)
        }
    };
    let input_tokens = count_input_tokens(
        &req.deployment,
        req.instructions.as_deref(),
        history,
        &req.input_items,
    );
    let budget = req
        .max_output_tokens
        .map_or(u64::from(cfg.completion_tokens), |m| {
            m.min(synth::MAX_COMPLETION_TOKENS)
        });
    let output = plan_output(budget, &cfg.name, &req.deployment);

    let api_version = query_param(query, "api-version").unwrap_or("unknown");
    let admission = match admit(
        shared,
        &req.deployment,
        tpm,
        input_tokens + output.tokens,
        OPERATION,
        api_version,
    ) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };

    let meta = Meta {
        id: new_id("resp_"),
        msg_id: new_id("msg_"),
        created_at: SystemClock.unix_now().as_secs(),
        model,
        previous_response_id: req.previous_response_id,
        instructions: req.instructions,
        max_output_tokens: req.max_output_tokens,
        store: req.store,
        echoed: req.echoed,
    };
    let mut resp = if req.stream {
        start_stream(
            shared,
            meta,
            req.input_items,
            input_tokens,
            output,
            stream_fail,
        )
    } else {
        complete(shared, meta, req.input_items, input_tokens, output).await
    };
    if let Some(a) = admission {
        add_ratelimit_headers(resp.headers_mut(), &a);
    }
    resp
}

/// The JSON answer, after the simulated generation time.
async fn complete(
    shared: &Shared,
    meta: Meta,
    input_items: Vec<Value>,
    input_tokens: u64,
    output: Output,
) -> Response<SimBody> {
    let latency = shared.cfg.latency;
    let delay = latency.time_to_first_token.saturating_add(per_token_total(
        latency.per_token,
        output.pieces.len() as u64,
    ));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let text = output.text();
    let object = meta.completed(&text, input_tokens, output.tokens);
    if meta.store {
        let weight = stored_weight(&input_items, text.len());
        let stored = StoredResponse {
            object: object.clone(),
            input_items,
            output_text: text,
            previous: meta.previous_response_id.clone(),
        };
        lock(&shared.stores.responses).insert(meta.id.clone(), stored, weight);
    }
    json_response(StatusCode::OK, &object)
}

/// The SSE answer. A stored response is visible (`in_progress`) from the start and takes its
/// final form when the stream ends.
fn start_stream(
    shared: &Arc<Shared>,
    meta: Meta,
    input_items: Vec<Value>,
    input_tokens: u64,
    output: Output,
    fail: Option<StreamFail>,
) -> Response<SimBody> {
    if meta.store {
        let text = output.text();
        let weight = stored_weight(&input_items, text.len());
        let stored = StoredResponse {
            object: meta.response("in_progress", Vec::new(), Value::Null, Value::Null),
            input_items,
            output_text: text,
            previous: meta.previous_response_id.clone(),
        };
        lock(&shared.stores.responses).insert(meta.id.clone(), stored, weight);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let shared = shared.clone();
    tokio::spawn(async move {
        let final_object = produce_events(&shared, &meta, input_tokens, &output, fail, &tx).await;
        if meta.store
            && let Some(r) = lock(&shared.stores.responses).get_mut(&meta.id)
        {
            r.object = final_object;
        }
    });
    sse_response(rx)
}

/// `event: <type>\ndata: <json>\n\n`.
fn named_event(kind: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// Send the events of one response; returns the response's final form. When the client goes
/// away the rest is not sent, and the response counts as completed (as the service finishes
/// a response in the background).
async fn produce_events(
    shared: &Shared,
    meta: &Meta,
    input_tokens: u64,
    output: &Output,
    fail: Option<StreamFail>,
    tx: &mpsc::Sender<Bytes>,
) -> Value {
    let latency = shared.cfg.latency;
    let text = output.text();
    let completed = meta.completed(&text, input_tokens, output.tokens);
    let mut sequence = 0u64..;
    // Adds `type` and the next `sequence_number` and sends; when the client is gone,
    // returns early (with `completed` unless another final form is given).
    macro_rules! send {
        ($kind:expr, $fields:expr) => {
            send!($kind, $fields, completed)
        };
        ($kind:expr, $fields:expr, $gone:expr) => {{
            let mut event = $fields;
            event["type"] = json!($kind);
            event["sequence_number"] = json!(sequence.next());
            if tx.send(named_event($kind, &event)).await.is_err() {
                debug!("response stream receiver gone; stopping");
                return $gone;
            }
        }};
    }
    let item_id = meta.msg_id.as_str();
    let (output_index, content_index) = (0, 0);

    let in_progress = meta.response("in_progress", Vec::new(), Value::Null, Value::Null);
    send!("response.created", json!({ "response": in_progress }));
    send!("response.in_progress", json!({ "response": in_progress }));
    if !latency.time_to_first_token.is_zero() {
        tokio::time::sleep(latency.time_to_first_token).await;
    }
    send!(
        "response.output_item.added",
        json!({ "output_index": output_index, "item": meta.message("in_progress", None) })
    );
    send!(
        "response.content_part.added",
        json!({
            "item_id": item_id,
            "output_index": output_index,
            "content_index": content_index,
            "part": { "type": "output_text", "text": "", "annotations": [] },
        })
    );
    let deltas = if fail.is_some() {
        output.pieces.len().min(2)
    } else {
        output.pieces.len()
    };
    let mut sent = String::new();
    for piece in &output.pieces[..deltas] {
        if !latency.per_token.is_zero() {
            tokio::time::sleep(latency.per_token).await;
        }
        send!(
            "response.output_text.delta",
            json!({
                "item_id": item_id,
                "output_index": output_index,
                "content_index": content_index,
                "delta": piece,
                "logprobs": [],
            })
        );
        sent.push_str(piece);
    }
    if let Some(kind) = fail {
        debug!(?kind, "failing the response stream (x-sim-stream-fail)");
        let failed = meta.failed(&sent);
        match kind {
            StreamFail::ResponseFailed => {
                send!("response.failed", json!({ "response": failed }), failed);
            }
            StreamFail::Error => {
                send!(
                    "error",
                    json!({ "code": "server_error", "message": STREAM_FAIL_MESSAGE, "param": null }),
                    failed
                );
            }
        }
        return failed;
    }
    send!(
        "response.output_text.done",
        json!({
            "item_id": item_id,
            "output_index": output_index,
            "content_index": content_index,
            "text": text,
            "logprobs": [],
        })
    );
    send!(
        "response.content_part.done",
        json!({
            "item_id": item_id,
            "output_index": output_index,
            "content_index": content_index,
            "part": { "type": "output_text", "text": text, "annotations": [] },
        })
    );
    send!(
        "response.output_item.done",
        json!({ "output_index": output_index, "item": meta.message("completed", Some(&text)) })
    );
    send!(
        "response.completed",
        json!({ "response": completed.clone() })
    );
    completed
}

/// `GET .../responses/{id}`.
pub(crate) fn get(shared: &Shared, id: &str) -> Response<SimBody> {
    match lock(&shared.stores.responses).get(id) {
        Some(r) => json_response(StatusCode::OK, &r.object),
        None => unknown_id("Response", id),
    }
}

/// `DELETE .../responses/{id}`.
pub(crate) fn delete(shared: &Shared, id: &str) -> Response<SimBody> {
    match lock(&shared.stores.responses).remove(id) {
        Some(_) => json_response(
            StatusCode::OK,
            &json!({ "id": id, "object": "response", "deleted": true }),
        ),
        None => unknown_id("Response", id),
    }
}

/// `GET .../responses/{id}/input_items` (`limit`, `order` (default `desc`), `after`).
pub(crate) fn input_items(shared: &Shared, id: &str, query: Option<&str>) -> Response<SimBody> {
    let q = match ListQuery::parse(query, 20, 100) {
        Ok(q) => q,
        Err((message, param)) => {
            return oai_error(StatusCode::BAD_REQUEST, &message, Some(param), None);
        }
    };
    let items = match lock(&shared.stores.responses).get(id) {
        Some(r) => r.input_items.clone(),
        None => return unknown_id("Response", id),
    };
    json_response(StatusCode::OK, &list_page(items, &q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_shapes_normalise() {
        let items = normalize_input(&json!("hello")).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["type"], "message");
        assert_eq!(items[0]["role"], "user");
        assert_eq!(
            items[0]["content"],
            json!([{ "type": "input_text", "text": "hello" }])
        );
        assert!(items[0]["id"].as_str().unwrap().starts_with("msg_"));

        let items = normalize_input(&json!([
            { "role": "system", "content": "be brief" },
            { "type": "message", "role": "user", "id": "msg_given",
              "content": [{ "type": "input_text", "text": "hi" }, { "type": "input_image", "image_url": "x" }] },
            { "role": "assistant", "content": "earlier answer" },
            { "type": "function_call_output", "call_id": "c1", "output": "42" },
        ]))
        .unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(items[1]["id"], "msg_given");
        assert_eq!(items[1]["content"][1]["type"], "input_image");
        assert_eq!(items[2]["content"][0]["type"], "output_text");
        assert_eq!(items[3]["type"], "function_call_output");
        assert!(items[3]["id"].as_str().unwrap().starts_with("item_"));

        for bad in [
            json!([]),
            json!(42),
            json!(["text in an array"]),
            json!([{ "content": "no role" }]),
            json!([{ "role": "robot", "content": "x" }]),
            json!([{ "role": "user" }]),
            json!([{ "role": "user", "content": 5 }]),
            json!([{ "role": "user", "content": [{ "text": "no type" }] }]),
        ] {
            assert!(normalize_input(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_bodies_validate() {
        let ok = parse_create(&json!({ "model": "gpt-4o", "input": "x" })).unwrap();
        assert!(ok.store && !ok.stream);
        assert_eq!(ok.previous_response_id, None);
        let full = parse_create(&json!({
            "model": "gpt-4o", "input": "x", "instructions": "be kind", "stream": true,
            "store": false, "previous_response_id": "resp_1", "max_output_tokens": 7,
            "temperature": 0.2, "metadata": { "k": "v" }, "seed": 1,
        }))
        .unwrap();
        assert_eq!(full.instructions.as_deref(), Some("be kind"));
        assert!(full.stream && !full.store);
        assert_eq!(full.previous_response_id.as_deref(), Some("resp_1"));
        assert_eq!(full.max_output_tokens, Some(7));
        assert_eq!(full.echoed["temperature"], 0.2);
        assert!(!full.echoed.contains_key("seed"));

        let missing = parse_create(&json!({ "input": "x" })).unwrap_err();
        assert_eq!(missing.param.as_deref(), Some("model"));
        assert_eq!(missing.code, Some("missing_required_parameter"));
        for bad in [
            json!({ "model": "", "input": "x" }),
            json!({ "model": 4, "input": "x" }),
            json!({ "model": "m" }),
            json!({ "model": "m", "input": "x", "stream": "yes" }),
            json!({ "model": "m", "input": "x", "store": 1 }),
            json!({ "model": "m", "input": "x", "instructions": [] }),
            json!({ "model": "m", "input": "x", "previous_response_id": 3 }),
            json!({ "model": "m", "input": "x", "max_output_tokens": -1 }),
        ] {
            assert!(parse_create(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn output_ends_with_the_region_when_there_is_room() {
        let out = plan_output(10, "eastus", "gpt-4o");
        let text = out.text();
        assert!(text.starts_with("the lock"), "{text}");
        assert!(text.ends_with(" from eastus"), "{text}");
        assert_eq!(out.tokens, 10);
        let enc = sluice_tokens::encoding_for_model("gpt-4o");
        assert_eq!(u64::from(sluice_tokens::count_text(enc, &text)), 10);

        // Too small a budget: only words, exactly the budget.
        let out = plan_output(2, "eastus", "gpt-4o");
        assert_eq!(out.text(), "the lock");
        assert_eq!(out.tokens, 2);
        let out = plan_output(0, "eastus", "gpt-4o");
        assert!(out.pieces.is_empty());
        assert_eq!(out.tokens, 0);
    }

    #[test]
    fn input_tokens_count_like_chat_and_include_the_chain() {
        let items = normalize_input(&json!("Hello there!")).unwrap();
        // As the chat test: 3 per message + "user" (1) + "Hello there!" (3), + 3 priming.
        assert_eq!(count_input_tokens("gpt-4o", None, Vec::new(), &items), 10);
        // Instructions add a message: 3 + "developer" (1) + "be brief" (2).
        assert_eq!(
            count_input_tokens("gpt-4o", Some("be brief"), Vec::new(), &items),
            16
        );

        let mut store = BoundedStore::new(10, usize::MAX);
        store.insert(
            "resp_a".to_string(),
            StoredResponse {
                object: json!({}),
                input_items: normalize_input(&json!("first")).unwrap(),
                output_text: "the lock".into(),
                previous: None,
            },
            1,
        );
        store.insert(
            "resp_b".to_string(),
            StoredResponse {
                object: json!({}),
                input_items: normalize_input(&json!("second")).unwrap(),
                output_text: "gate".into(),
                previous: Some("resp_a".into()),
            },
            1,
        );
        let chain = chain_messages(&store, "resp_b");
        let roles: Vec<&str> = chain.iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
        assert_eq!(chain[1]["content"], "the lock");
        assert_eq!(chain[3]["content"], "gate");
        let with_chain = count_input_tokens("gpt-4o", None, chain, &items);
        assert!(with_chain > 10, "{with_chain}");
        // A chain whose start was deleted contributes nothing.
        assert!(chain_messages(&store, "resp_gone").is_empty());
    }
}
