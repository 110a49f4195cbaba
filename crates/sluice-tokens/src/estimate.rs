//! Prompt-token estimates from request bodies.

use serde_json::{Map, Value};

// Prompt texts repeat (system prompts, a conversation resent every turn):
// their counts are remembered.
use crate::chat_body::{ChatBody, Cost};
use crate::memo::count;
use crate::{Encoding, Operation, encoding_for_model};

/// Tokens charged per chat message for its framing (OpenAI cookbook).
const TOKENS_PER_MESSAGE: u64 = 3;
/// Extra token when a message has a `name` (OpenAI cookbook).
const TOKENS_PER_NAME: u64 = 1;
/// Tokens priming the reply, once per request (OpenAI cookbook).
const REPLY_PRIMING: u64 = 3;
/// Fixed estimate per image part, as APIM's token-limit policy uses.
pub(crate) const IMAGE_TOKENS: u64 = 1200;
/// Fixed estimate per Responses `input_file` part. The part holds base64 data, a URL or a file id,
/// none of which is the text the model reads (pages of extracted text and images), so its JSON
/// text would be either far too high (base64) or far too low (an id); like an image it gets a
/// flat cost, and the backend's reported usage settles the actual charge afterwards.
const FILE_TOKENS: u64 = 1200;

/// What the gateway learns from a request body before forwarding it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestEstimate {
    /// Estimated prompt tokens (0 for [`Operation::Other`] or an unreadable body).
    pub prompt_tokens: u32,
    /// The most completion tokens the request allows for one choice: `max_completion_tokens`, else
    /// `max_tokens`, else `max_output_tokens` (Responses API), when present as a non-negative integer.
    pub max_completion_tokens: Option<u32>,
    /// Choices requested (`n`), when present as an integer of at least 1.
    pub choices: Option<u32>,
    /// `stream_options.include_usage` is `true`.
    pub include_usage: bool,
    /// The body's `model` (the v1 API names the model there), if it is a string.
    pub model: Option<String>,
}

/// Reads a request body before it is forwarded.
///
/// `deployment` is the deployment from the path, when the path has one; otherwise the body's
/// `model` picks the vocabulary ([`encoding_for_model`]); embeddings always use cl100k, the
/// vocabulary of every OpenAI embedding model.
///
/// * Chat: per message 3 tokens plus the tokens of each string field (role, content, name, …),
///   +1 for a `name`, +3 once for the reply priming (the OpenAI cookbook's scheme). A `content`
///   list counts its text (and refusal) parts and 1200 tokens per image part, as APIM does; other
///   non-string fields (e.g. `tool_calls`) and the request's `tools`/`functions` count as the
///   tokens of their JSON text, a rough but deterministic estimate.
/// * Completions: `prompt` — a string, a list of strings, or token array(s) (their length).
/// * Embeddings: `input`, with the same shapes.
/// * Responses: `instructions` as one message (3 + its tokens + the tokens of `developer`), and
///   `input`: a string as one user message, or a list of items, each charged 3 tokens plus
///   - a message (`{role, content}`, with or without `"type": "message"`): its role and its
///     content, a string or a list of parts — `input_text`/`output_text` by their `text`,
///     `refusal` by its refusal, `input_image` at 1200 tokens as for chat, `input_file` at a
///     fixed 1200 tokens (its data is not the text the model reads);
///   - a `function_call`: its `name` and `arguments`;
///   - a `function_call_output`: its `output` (a string, or a list of parts as above);
///   - any other item (reasoning, built-in tool calls, item references, …): its JSON text;
///
///   then +3 for the reply priming when there was any instruction or input, and the `tools` as
///   their JSON text. Context the backend holds (`previous_response_id`, `conversation`, stored
///   prompts) is invisible here and not estimated.
///
/// Invalid JSON, or a body that is not an object, gives `RequestEstimate::default()`.
///
/// Whether the request streams is not read here: `sluice_policy::stream_flag` is the one place that
/// decides it (for `x-ms-stream`, token charging and usage reading alike).
pub fn estimate_request(op: Operation, deployment: Option<&str>, body: &[u8]) -> RequestEstimate {
    match op {
        // The hot case reads the body without building a tree.
        Operation::ChatCompletions => chat_estimate(deployment, body),
        _ => estimate_from_tree(op, deployment, body),
    }
}

/// [`estimate_request`] for a chat completions body, read in one pass
/// ([`ChatBody`]); the same answer as [`estimate_from_tree`] gives.
fn chat_estimate(deployment: Option<&str>, body: &[u8]) -> RequestEstimate {
    let Some(chat) = ChatBody::read(body) else {
        return RequestEstimate::default();
    };
    let model = chat
        .model
        .as_ref()
        .and_then(Value::as_str)
        .map(str::to_owned);
    let encoding = encoding_for_model(
        deployment
            .filter(|d| !d.is_empty())
            .or(model.as_deref())
            .unwrap_or(""),
    );
    let mut n = 0u64;
    if let Some(messages) = &chat.messages {
        for message in messages {
            n = n.saturating_add(TOKENS_PER_MESSAGE);
            for (key, cost) in message {
                n = n.saturating_add(cost_tokens(encoding, cost));
                if key == "name" {
                    n = n.saturating_add(TOKENS_PER_NAME);
                }
            }
        }
        n = n.saturating_add(REPLY_PRIMING);
    }
    for v in [&chat.tools, &chat.functions].into_iter().flatten() {
        if v.is_array() || v.is_object() {
            n = n.saturating_add(json_tokens(encoding, v));
        }
    }
    let get = |key: &str| match key {
        "max_completion_tokens" => chat.max_completion_tokens.as_ref(),
        "max_tokens" => chat.max_tokens.as_ref(),
        "max_output_tokens" => chat.max_output_tokens.as_ref(),
        "n" => chat.n.as_ref(),
        "stream_options" => chat.stream_options.as_ref(),
        _ => None,
    };
    finish_estimate(n, get, model)
}

/// The tokens of one message field or `content` part.
fn cost_tokens(enc: Encoding, cost: &Cost<'_>) -> u64 {
    match cost {
        Cost::Zero => 0,
        Cost::Text(s) => count(enc, s),
        Cost::Fixed(n) => *n,
        Cost::Json(v) => json_tokens(enc, v),
        Cost::Parts(parts) => parts
            .iter()
            .map(|p| cost_tokens(enc, p))
            .fold(0u64, u64::saturating_add),
    }
}

/// The estimate of a prompt of `prompt` tokens, with the limits the body's
/// fields (`get`) set.
fn finish_estimate<'v>(
    prompt: u64,
    get: impl Fn(&str) -> Option<&'v Value>,
    model: Option<String>,
) -> RequestEstimate {
    let max_completion_tokens = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| get(k).and_then(Value::as_u64))
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    RequestEstimate {
        prompt_tokens: u32::try_from(prompt).unwrap_or(u32::MAX),
        max_completion_tokens,
        choices: get("n")
            .and_then(Value::as_u64)
            .filter(|n| *n >= 1)
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        include_usage: get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true),
        model,
    }
}

/// [`estimate_request`] through a `serde_json::Value` tree: every operation
/// but chat (and chat in the tests, as the reference for [`chat_estimate`]).
fn estimate_from_tree(op: Operation, deployment: Option<&str>, body: &[u8]) -> RequestEstimate {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return RequestEstimate::default();
    };
    let model = obj.get("model").and_then(Value::as_str).map(str::to_owned);
    let encoding = match (op, deployment.filter(|d| !d.is_empty())) {
        (Operation::Embeddings, _) => Encoding::Cl100kBase,
        (_, Some(d)) => encoding_for_model(d),
        (_, None) => encoding_for_model(model.as_deref().unwrap_or("")),
    };
    let prompt = match op {
        Operation::ChatCompletions => chat_tokens(encoding, &obj),
        Operation::Completions => obj.get("prompt").map_or(0, |p| input_tokens(encoding, p)),
        Operation::Embeddings => obj.get("input").map_or(0, |i| input_tokens(encoding, i)),
        Operation::Responses => responses_tokens(encoding, &obj),
        Operation::Other => 0,
    };
    finish_estimate(prompt, |k| obj.get(k), model)
}

fn chat_tokens(enc: Encoding, obj: &Map<String, Value>) -> u64 {
    let mut n = 0u64;
    if let Some(Value::Array(messages)) = obj.get("messages") {
        for message in messages {
            let Value::Object(fields) = message else {
                continue;
            };
            n = n.saturating_add(TOKENS_PER_MESSAGE);
            for (key, value) in fields {
                let t = match (key.as_str(), value) {
                    (_, Value::String(s)) => count(enc, s),
                    ("content", Value::Array(parts)) => content_parts(enc, parts),
                    (_, Value::Null | Value::Bool(_) | Value::Number(_)) => 0,
                    (_, other) => json_tokens(enc, other),
                };
                n = n.saturating_add(t);
                if key == "name" {
                    n = n.saturating_add(TOKENS_PER_NAME);
                }
            }
        }
        n = n.saturating_add(REPLY_PRIMING);
    }
    for key in ["tools", "functions"] {
        if let Some(v) = obj.get(key).filter(|v| v.is_array() || v.is_object()) {
            n = n.saturating_add(json_tokens(enc, v));
        }
    }
    n
}

/// Tokens of a chat `content` list: text and refusal parts by their text, images at a fixed cost,
/// anything else by a `text` field if it has one.
fn content_parts(enc: Encoding, parts: &[Value]) -> u64 {
    parts
        .iter()
        .map(|part| match part {
            Value::String(s) => count(enc, s),
            Value::Object(p) => {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                match kind {
                    "image_url" | "image" | "input_image" => IMAGE_TOKENS,
                    "refusal" => str_field(enc, p, "refusal"),
                    _ => str_field(enc, p, "text"),
                }
            }
            _ => 0,
        })
        .fold(0u64, u64::saturating_add)
}

fn str_field(enc: Encoding, obj: &Map<String, Value>, key: &str) -> u64 {
    obj.get(key)
        .and_then(Value::as_str)
        .map_or(0, |s| count(enc, s))
}

/// Tokens of a Responses request's prompt (see [`estimate_request`]).
fn responses_tokens(enc: Encoding, obj: &Map<String, Value>) -> u64 {
    let mut n = 0u64;
    let mut any = false;
    if let Some(Value::String(s)) = obj.get("instructions") {
        n = n.saturating_add(message(enc, "developer", count(enc, s)));
        any = true;
    }
    match obj.get("input") {
        Some(Value::String(s)) => {
            n = n.saturating_add(message(enc, "user", count(enc, s)));
            any = true;
        }
        Some(Value::Array(items)) => {
            for item in items {
                if let Value::Object(item) = item {
                    n = n.saturating_add(response_item(enc, item));
                    any = true;
                }
            }
        }
        _ => {}
    }
    if any {
        n = n.saturating_add(REPLY_PRIMING);
    }
    if let Some(v) = obj.get("tools").filter(|v| v.is_array() || v.is_object()) {
        n = n.saturating_add(json_tokens(enc, v));
    }
    n
}

/// A message of `role` whose content has `content` tokens, with its framing.
fn message(enc: Encoding, role: &str, content: u64) -> u64 {
    TOKENS_PER_MESSAGE
        .saturating_add(count(enc, role))
        .saturating_add(content)
}

/// One item of a Responses `input` list, framing included.
fn response_item(enc: Encoding, item: &Map<String, Value>) -> u64 {
    let kind = item.get("type").and_then(Value::as_str);
    let body = match kind {
        None | Some("message") => {
            let role = item.get("role").and_then(Value::as_str).unwrap_or("");
            return message(enc, role, response_content(enc, item.get("content")));
        }
        Some("function_call") => {
            str_field(enc, item, "name").saturating_add(str_field(enc, item, "arguments"))
        }
        Some("function_call_output") => response_content(enc, item.get("output")),
        Some(_) => json_tokens(enc, item),
    };
    TOKENS_PER_MESSAGE.saturating_add(body)
}

/// A Responses message `content` (or function output): a string, or a list of parts.
fn response_content(enc: Encoding, content: Option<&Value>) -> u64 {
    match content {
        Some(Value::String(s)) => count(enc, s),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|part| match part {
                Value::Object(p) => match p.get("type").and_then(Value::as_str).unwrap_or("") {
                    "input_image" | "image_url" | "image" => IMAGE_TOKENS,
                    "input_file" | "file" => FILE_TOKENS,
                    "refusal" => str_field(enc, p, "refusal"),
                    _ => str_field(enc, p, "text"),
                },
                Value::String(s) => count(enc, s),
                _ => 0,
            })
            .fold(0u64, u64::saturating_add),
        Some(other @ Value::Object(_)) => json_tokens(enc, other),
        _ => 0,
    }
}

/// Tokens of a `prompt`/`input`: a string, a token array, or a list of strings / token arrays.
fn input_tokens(enc: Encoding, v: &Value) -> u64 {
    match v {
        Value::String(s) => count(enc, s),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => count(enc, s),
                Value::Number(_) => 1,
                Value::Array(tokens) => tokens.len() as u64,
                _ => 0,
            })
            .fold(0u64, u64::saturating_add),
        _ => 0,
    }
}

/// Tokens of a JSON value's compact text.
fn json_tokens<T: serde::Serialize + ?Sized>(enc: Encoding, v: &T) -> u64 {
    serde_json::to_string(v).map_or(0, |s| count(enc, &s))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::count_text;

    fn chat(deployment: Option<&str>, body: &Value) -> RequestEstimate {
        estimate_request(
            Operation::ChatCompletions,
            deployment,
            body.to_string().as_bytes(),
        )
    }

    fn cookbook_messages() -> Value {
        json!([
            {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
            {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
            {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
            {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
            {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
            {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
        ])
    }

    #[test]
    fn chat_matches_the_cookbook() {
        // The cookbook's (and tiktoken-rs's) published totals for these messages.
        let body = json!({"messages": cookbook_messages()});
        assert_eq!(chat(Some("gpt-4-0613"), &body).prompt_tokens, 129);
        assert_eq!(chat(Some("gpt-35-turbo"), &body).prompt_tokens, 129);
        assert_eq!(chat(Some("gpt-4o"), &body).prompt_tokens, 124);
        // Without a deployment the body's model decides.
        let v1 = json!({"model": "gpt-4", "messages": cookbook_messages()});
        let e = chat(None, &v1);
        assert_eq!(e.prompt_tokens, 129);
        assert_eq!(e.model.as_deref(), Some("gpt-4"));
    }

    #[test]
    fn chat_agrees_with_tiktoken_rs() {
        use tiktoken_rs::{ChatCompletionRequestMessage as M, num_tokens_from_messages};
        let msgs = [
            ("system", None, "Be brief."),
            ("user", Some("alice"), "What's 2+2? Answer in 𝔘𝔫𝔦𝔠𝔬𝔡𝔢."),
            ("assistant", None, "4"),
        ];
        let ours = json!({"messages": msgs.iter().map(|(r, n, c)| {
            let mut m = json!({"role": r, "content": c});
            if let Some(n) = n { m["name"] = json!(n); }
            m
        }).collect::<Vec<_>>()});
        let theirs: Vec<M> = msgs
            .iter()
            .map(|(r, n, c)| M {
                role: (*r).into(),
                name: n.map(Into::into),
                content: Some((*c).into()),
                ..Default::default()
            })
            .collect();
        for model in ["gpt-4o", "gpt-4"] {
            let expected = num_tokens_from_messages(model, &theirs).unwrap() as u32;
            assert_eq!(chat(Some(model), &ours).prompt_tokens, expected, "{model}");
        }
    }

    #[test]
    fn chat_parts_images_name_and_tools() {
        let enc = Encoding::O200kBase;
        let c = |s: &str| count_text(enc, s);
        let body = json!({
            "messages": [{
                "role": "user",
                "name": "bob",
                "content": [
                    {"type": "text", "text": "Describe these pictures."},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                ],
            }],
        });
        let expected = 3 + c("user") + c("bob") + 1 + c("Describe these pictures.") + 2 * 1200 + 3;
        assert_eq!(chat(Some("gpt-4o"), &body).prompt_tokens, expected);

        let tools = json!([{"type": "function", "function": {
            "name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let mut with_tools = body.clone();
        with_tools["tools"] = tools.clone();
        assert_eq!(
            chat(Some("gpt-4o"), &with_tools).prompt_tokens,
            expected + c(&tools.to_string())
        );
        let mut with_functions = body.clone();
        with_functions["functions"] = json!([{"name": "f", "parameters": {}}]);
        with_functions["tools"] = Value::Null;
        assert_eq!(
            chat(Some("gpt-4o"), &with_functions).prompt_tokens,
            expected + c(r#"[{"name":"f","parameters":{}}]"#)
        );
    }

    #[test]
    fn chat_string_and_refusal_parts() {
        let c = |s: &str| count_text(Encoding::O200kBase, s);
        let body = json!({"messages": [{"role": "assistant", "content": [
            "plain string part",
            {"type": "refusal", "refusal": "I won't."},
            {"type": "text", "text": "But here is this."},
            {"type": "other"},
            7,
        ]}]});
        assert_eq!(
            chat(Some("gpt-4o"), &body).prompt_tokens,
            3 + c("assistant")
                + c("plain string part")
                + c("I won't.")
                + c("But here is this.")
                + 3
        );
    }

    #[test]
    fn chat_tool_call_history_and_null_content() {
        let enc = Encoding::Cl100kBase;
        let c = |s: &str| count_text(enc, s);
        let calls = json!([{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]);
        let body = json!({"messages": [
            {"role": "assistant", "content": null, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21°C"},
            "not a message",
        ]});
        let expected = 3
            + c("assistant")
            + c(&calls.to_string())
            + 3
            + c("tool")
            + c("call_1")
            + c("Sunny, 21°C")
            + 3;
        assert_eq!(chat(Some("gpt-4"), &body).prompt_tokens, expected);
    }

    #[test]
    fn flags_and_limits() {
        let body = json!({
            "messages": [{"role": "user", "content": "hi"}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 50,
            "max_completion_tokens": 70,
        });
        let e = chat(Some("gpt-4o"), &body);
        assert!(e.include_usage);
        assert_eq!(e.max_completion_tokens, Some(70));
        assert_eq!(e.choices, None);
        assert_eq!(e.prompt_tokens, 3 + 1 + 1 + 3);
        assert_eq!(e.model, None);

        let body = json!({"messages": [], "stream": "yes", "stream_options": {"include_usage": 1},
            "max_tokens": 5_000_000_000u64});
        let e = chat(Some("gpt-4o"), &body);
        assert!(!e.include_usage);
        assert_eq!(e.max_completion_tokens, Some(u32::MAX));
        assert_eq!(e.prompt_tokens, 3);

        let body = json!({"messages": [], "max_tokens": -1, "n": 0, "stream": false});
        let e = chat(None, &body);
        assert_eq!(e.max_completion_tokens, None);
        assert_eq!(e.choices, None);

        // max_tokens when max_completion_tokens is absent; n choices.
        let body = json!({"messages": [], "max_tokens": 40, "max_output_tokens": 90, "n": 3});
        let e = chat(None, &body);
        assert_eq!((e.max_completion_tokens, e.choices), (Some(40), Some(3)));
        // The Responses API's max_output_tokens.
        let body = json!({"input": "hi", "max_output_tokens": 90, "n": 5_000_000_000u64});
        let e = estimate_request(Operation::Other, None, body.to_string().as_bytes());
        assert_eq!(
            (e.max_completion_tokens, e.choices),
            (Some(90), Some(u32::MAX))
        );
    }

    #[test]
    fn completions_prompts() {
        let enc = Encoding::Cl100kBase;
        let c = |s: &str| count_text(enc, s);
        let est = |body: Value| {
            estimate_request(
                Operation::Completions,
                Some("gpt-35-turbo-instruct"),
                body.to_string().as_bytes(),
            )
        };
        assert_eq!(
            est(json!({"prompt": "Once upon a time"})).prompt_tokens,
            c("Once upon a time")
        );
        assert_eq!(
            est(json!({"prompt": ["Once upon", " a time"], "max_tokens": 9})),
            RequestEstimate {
                prompt_tokens: c("Once upon") + c(" a time"),
                max_completion_tokens: Some(9),
                ..Default::default()
            }
        );
        assert_eq!(est(json!({"prompt": [1, 2, 3, 4]})).prompt_tokens, 4);
        assert_eq!(est(json!({"prompt": [[1, 2], [3]]})).prompt_tokens, 3);
        assert_eq!(est(json!({"prompt": null})).prompt_tokens, 0);
        assert_eq!(est(json!({})).prompt_tokens, 0);
    }

    #[test]
    fn embeddings_inputs() {
        let c = |s: &str| count_text(Encoding::Cl100kBase, s);
        let est = |dep: Option<&str>, body: Value| {
            estimate_request(Operation::Embeddings, dep, body.to_string().as_bytes()).prompt_tokens
        };
        let text = "The food was delicious and the waiter was very friendly.";
        assert_eq!(est(Some("embed"), json!({"input": text})), c(text));
        // Embedding models are cl100k whatever the deployment is called.
        let ru = "Привет, как дела? Это тест.";
        assert_eq!(est(Some("gpt-4o"), json!({"input": ru})), 13);
        assert_eq!(count_text(Encoding::O200kBase, ru), 9);
        assert_eq!(
            est(None, json!({"input": [text, "hello world"], "model": "x"})),
            c(text) + 2
        );
        assert_eq!(est(Some("e"), json!({"input": [10, 20, 30]})), 3);
        assert_eq!(
            est(Some("e"), json!({"input": [[10, 20], [30, 40, 50]]})),
            5
        );
        assert_eq!(est(Some("e"), json!({"input": 5})), 0);
    }

    #[test]
    fn unreadable_bodies_give_the_default() {
        for body in [
            &b""[..],
            b"not json",
            b"{\"messages\": [",
            b"[1,2,3]",
            b"\"text\"",
            b"null",
            b"\xff\xfe",
        ] {
            for op in [
                Operation::ChatCompletions,
                Operation::Completions,
                Operation::Embeddings,
                Operation::Responses,
                Operation::Other,
            ] {
                assert_eq!(
                    estimate_request(op, Some("gpt-4o"), body),
                    RequestEstimate::default()
                );
            }
        }
        // Deep nesting is no stack overflow: the tree is refused by serde_json's
        // recursion limit; the chat reader skips what it does not read without
        // recursing (a list of one non-message: the reply priming alone).
        let deep = format!(
            "{{\"messages\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(
            estimate_from_tree(Operation::ChatCompletions, None, deep.as_bytes()),
            RequestEstimate::default()
        );
        assert_eq!(
            estimate_request(Operation::ChatCompletions, None, deep.as_bytes()).prompt_tokens,
            3
        );
        let deep_field = format!(
            "{{\"messages\":[{{\"role\":\"user\",\"x\":{}{}}}]}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(
            estimate_request(Operation::ChatCompletions, None, deep_field.as_bytes()),
            RequestEstimate::default()
        );
        // Messages that are not a list, or odd shapes, are tolerated.
        let odd = json!({"messages": {"role": "user"}, "tools": 5});
        assert_eq!(chat(None, &odd).prompt_tokens, 0);
    }

    #[test]
    fn other_operations_read_flags_only() {
        let body = json!({"model": "gpt-4o", "input": "hello", "stream": true});
        let e = estimate_request(Operation::Other, None, body.to_string().as_bytes());
        assert_eq!(e.prompt_tokens, 0);
        assert_eq!(e.model.as_deref(), Some("gpt-4o"));
    }

    fn responses(deployment: Option<&str>, body: &Value) -> RequestEstimate {
        estimate_request(
            Operation::Responses,
            deployment,
            body.to_string().as_bytes(),
        )
    }

    #[test]
    fn responses_string_input_and_instructions() {
        let enc = Encoding::O200kBase;
        let c = |s: &str| count_text(enc, s);
        let body = json!({
            "model": "gpt-4.1",
            "instructions": "Talk like a pirate.",
            "input": "Are semicolons optional in JavaScript?",
            "max_output_tokens": 300,
            "stream": true,
        });
        let e = responses(None, &body);
        assert_eq!(
            e,
            RequestEstimate {
                prompt_tokens: 3
                    + c("developer")
                    + c("Talk like a pirate.")
                    + 3
                    + c("user")
                    + c("Are semicolons optional in JavaScript?")
                    + 3,
                max_completion_tokens: Some(300),
                choices: None,
                include_usage: false,
                model: Some("gpt-4.1".into()),
            }
        );
        // The encoding follows the deployment, else the model.
        let text = "Привет, как дела? Это тест.";
        let cl = count_text(Encoding::Cl100kBase, text);
        assert_ne!(cl, count_text(enc, text));
        let body = json!({"model": "gpt-4", "input": text});
        let cl_user = count_text(Encoding::Cl100kBase, "user");
        assert_eq!(responses(None, &body).prompt_tokens, 3 + cl_user + cl + 3);
        assert_eq!(
            responses(Some("gpt-4o"), &body).prompt_tokens,
            3 + c("user") + c(text) + 3
        );
        // Instructions alone; neither (nothing to prime); non-string shapes are ignored.
        assert_eq!(
            responses(None, &json!({"instructions": "Be terse."})).prompt_tokens,
            3 + c("developer") + c("Be terse.") + 3
        );
        for body in [
            json!({}),
            json!({"input": null, "instructions": null}),
            json!({"input": 5, "instructions": ["x"]}),
            json!({"input": [], "instructions": {"a": "b"}}),
            json!({"input": ["text", 1, null]}),
        ] {
            assert_eq!(responses(None, &body).prompt_tokens, 0, "{body}");
        }
    }

    #[test]
    fn responses_item_list() {
        let enc = Encoding::O200kBase;
        let c = |s: &str| count_text(enc, s);
        let reasoning = json!({"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Thought about it."}]});
        let tools = json!([{"type": "function", "name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
        let body = json!({
            "model": "gpt-4o",
            "input": [
                {"role": "system", "content": "Be brief."},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "What is in this image and file?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
                    {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQ="},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                    "loose text",
                    7,
                ]},
                {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed", "content": [
                    {"type": "output_text", "text": "A cat and a report.", "annotations": []},
                    {"type": "refusal", "refusal": "No more."},
                ]},
                reasoning.clone(),
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21°C"},
                {"type": "function_call_output", "call_id": "call_2", "output": [
                    {"type": "input_text", "text": "Chart:"},
                    {"type": "input_image", "image_url": "https://example.com/c.png"},
                ]},
                {"type": "function_call_output", "call_id": "call_3", "output": {"odd": true}},
                {"type": "function_call_output", "call_id": "call_4"},
                {"role": "user"},
                "not an item",
            ],
            "tools": tools.clone(),
        });
        let expected = (3 + c("system") + c("Be brief."))
            + (3 + c("user")
                + c("What is in this image and file?")
                + 1200
                + 1200
                + c("loose text"))
            + (3 + c("assistant") + c("A cat and a report.") + c("No more."))
            + (3 + c(&reasoning.to_string()))
            + (3 + c("get_weather") + c("{\"city\":\"Oslo\"}"))
            + (3 + c("Sunny, 21°C"))
            + (3 + c("Chart:") + 1200)
            + (3 + c(r#"{"odd":true}"#))
            + 3
            + (3 + c("user"))
            + 3
            + c(&tools.to_string());
        assert_eq!(responses(None, &body).prompt_tokens, expected);
        // Tools alone: no message framing, no priming; a non-list `tools` is ignored.
        assert_eq!(
            responses(None, &json!({"tools": tools})).prompt_tokens,
            c(&tools.to_string())
        );
        assert_eq!(responses(None, &json!({"tools": "all"})).prompt_tokens, 0);
        // A content that is an object counts as its JSON text.
        assert_eq!(
            responses(
                None,
                &json!({"input": [{"role": "user", "content": {"text": "x"}}]})
            )
            .prompt_tokens,
            3 + c("user") + c(r#"{"text":"x"}"#) + 3
        );
        // Chat's `image_url` / `file` part names count the same.
        assert_eq!(
            responses(None, &json!({"input": [{"role": "user", "content": [
                {"type": "image_url"}, {"type": "image"}, {"type": "file"}, {"type": "input_text"}]}]}))
            .prompt_tokens,
            3 + c("user") + 3 * 1200 + 3
        );
    }

    #[test]
    fn responses_limits_and_flags() {
        let body = json!({"input": "hi", "max_output_tokens": 1000, "stream": true,
            "stream_options": {"include_usage": true}});
        let e = responses(Some("gpt-4o"), &body);
        assert_eq!(e.max_completion_tokens, Some(1000));
        assert!(e.include_usage);
        let body = json!({"input": "hi", "max_output_tokens": null});
        assert_eq!(responses(None, &body).max_completion_tokens, None);
        assert_eq!(
            estimate_request(Operation::Responses, None, b"not json"),
            RequestEstimate::default()
        );
    }

    /// The chat reader and the tree agree on `body`.
    fn same_as_tree(deployment: Option<&str>, body: &[u8]) {
        assert_eq!(
            chat_estimate(deployment, body),
            estimate_from_tree(Operation::ChatCompletions, deployment, body),
            "{}",
            String::from_utf8_lossy(body)
        );
    }

    #[test]
    fn the_chat_reader_reads_what_the_tree_reads() {
        let bodies = [
            json!({"messages": cookbook_messages()}).to_string(),
            json!({"model": "gpt-4", "messages": cookbook_messages(), "max_tokens": 5, "n": 2}).to_string(),
            json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:..."}},
                {"type": "input_image"}, {"type": "image"},
                {"type": "refusal", "refusal": "no", "text": "ignored"},
                {"type": "other", "text": "counted"},
                {"text": "typeless"}, {"type": 5, "text": "t"}, {"type": "text", "text": 7},
                "a bare string part", 42, null, ["nested"], {"type": "refusal"}
            ]}]})
            .to_string(),
            json!({"messages": [
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"role": "assistant", "function_call": {"name": "g", "arguments": "{}"}},
                {"role": "user", "content": {"an": "object"}, "name": "bob", "weight": 1.5, "flag": true}
            ], "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
               "functions": {"name": "g"}, "max_completion_tokens": 9, "max_tokens": 3,
               "stream_options": {"include_usage": true}})
            .to_string(),
            json!({"messages": {"role": "user"}, "tools": 5}).to_string(),
            json!({"messages": [1, "x", null, [], {"role": "user", "content": "hi"}]}).to_string(),
            json!({"messages": [], "max_output_tokens": 4, "n": 0}).to_string(),
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1, "n": "2", "stream_options": {"include_usage": "yes"}}).to_string(),
            json!({"other": {"deep": [1, {"a": "b"}]}, "messages": [{"role": "user", "content": "é 你好 👋🏽"}]}).to_string(),
            // Keys given twice: the last one counts.
            r#"{"messages":[{"role":"user","content":"first"}],"messages":[{"role":"user","content":"second one here"}]}"#.to_string(),
            r#"{"messages":[{"role":"user","content":"short","content":"a much longer content wins"}]}"#.to_string(),
            r#"{"messages":[{"role":"user","content":[{"type":"image","type":"text","text":"t","text":"last text"}]}]}"#.to_string(),
            r#"{"messages":[{"role":"user"}],"messages":"no longer a list"}"#.to_string(),
            r#"{"model":"gpt-4","model":"gpt-4o","messages":[{"role":"user","content":"which vocabulary?"}]}"#.to_string(),
            r#"{"max_tokens":1,"max_tokens":7,"n":3,"n":null}"#.to_string(),
            // Escapes in keys and values.
            r#"{"messages":[{"role":"user","content":"esc"aped \ text é","name":"x"}]}"#.to_string(),
            r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#.to_string(),
            // Whitespace everywhere.
            " { \"messages\" : [ { \"role\" : \"user\" , \"content\" : \"spaced\" } ] , \"max_tokens\" : 2 } ".to_string(),
            // Not readable: the default from both.
            "{\"messages\": [".to_string(),
            "[1,2]".to_string(),
            "{} trailing".to_string(),
            r#"{"messages":[{"role":"user","content":"x"}]}}"#.to_string(),
            "".to_string(),
        ];
        for body in &bodies {
            for deployment in [None, Some("gpt-4o"), Some("gpt-35-turbo"), Some("")] {
                same_as_tree(deployment, body.as_bytes());
            }
        }
    }

    #[test]
    fn the_chat_reader_reads_random_bodies_as_the_tree_does() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        fn text(rng: &mut StdRng) -> String {
            const WORDS: [&str; 8] = ["hello", " world", "é", "你好", "\"q\"", "\\", "\n", "  "];
            (0..rng.random_range(0..6))
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect()
        }
        fn value(rng: &mut StdRng, depth: u32) -> Value {
            match rng.random_range(0..if depth > 2 { 4 } else { 7 }) {
                0 => Value::Null,
                1 => json!(rng.random_range(-3i64..100)),
                2 => json!(rng.random_bool(0.5)),
                3 => json!(text(rng)),
                4 => Value::Array(
                    (0..rng.random_range(0..4))
                        .map(|_| value(rng, depth + 1))
                        .collect(),
                ),
                5 => {
                    let kinds = ["text", "image_url", "refusal", "other", "input_image"];
                    json!({"type": kinds[rng.random_range(0..kinds.len())], "text": text(rng), "refusal": value(rng, depth + 1)})
                }
                _ => json!({"k": value(rng, depth + 1), "text": text(rng)}),
            }
        }
        let mut rng = StdRng::seed_from_u64(11);
        let keys = ["role", "content", "name", "tool_calls", "x"];
        for _ in 0..600 {
            let messages: Vec<Value> = (0..rng.random_range(0..5))
                .map(|_| {
                    if rng.random_bool(0.1) {
                        return value(&mut rng, 1);
                    }
                    let mut m = serde_json::Map::new();
                    for _ in 0..rng.random_range(0..5) {
                        let k = keys[rng.random_range(0..keys.len())];
                        m.insert(k.to_string(), value(&mut rng, 1));
                    }
                    Value::Object(m)
                })
                .collect();
            let mut body = json!({"messages": messages});
            if rng.random_bool(0.3) {
                body["tools"] = value(&mut rng, 1);
            }
            if rng.random_bool(0.3) {
                body["max_tokens"] = value(&mut rng, 2);
            }
            if rng.random_bool(0.3) {
                body["model"] = json!(["gpt-4", "gpt-4o", "x"][rng.random_range(0..3)]);
            }
            let text = if rng.random_bool(0.5) {
                serde_json::to_string_pretty(&body).unwrap()
            } else {
                body.to_string()
            };
            same_as_tree(None, text.as_bytes());
        }
    }
}
