//! Usage read from a response body as it streams past, with bounded memory.

use std::fmt;

use memchr::memchr2;
use serde::Deserialize;

use crate::Encoding;
use crate::count::count;

/// The largest `usage` value (JSON bodies) kept for parsing; real ones are a few hundred bytes.
const MAX_USAGE_BYTES: usize = 64 * 1024;
/// The largest SSE line or event payload kept for parsing; a larger event is skipped.
const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Token usage of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt_tokens: u64,
    /// Completion (output) tokens; 0 for embeddings.
    pub completion_tokens: u64,
    /// Total tokens: as reported, else prompt + completion.
    pub total_tokens: u64,
}

/// Where a [`Usage`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The backend reported it (the body's `usage`, or a stream's usage chunk).
    Reported,
    /// Sluice counted it: the prompt estimate plus the streamed content's tokens.
    Counted,
}

/// A `usage` object as the backend sends it. The Responses API's `input_tokens`/`output_tokens`
/// are accepted as aliases.
#[derive(Deserialize)]
struct RawUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
}

impl RawUsage {
    /// `None` when the object has none of the token fields.
    fn into_usage(self) -> Option<Usage> {
        if self.prompt_tokens.is_none()
            && self.completion_tokens.is_none()
            && self.total_tokens.is_none()
        {
            return None;
        }
        let prompt_tokens = self.prompt_tokens.unwrap_or(0);
        let completion_tokens = self.completion_tokens.unwrap_or(0);
        Some(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: self
                .total_tokens
                .unwrap_or(prompt_tokens.saturating_add(completion_tokens)),
        })
    }
}

/// Reads usage from a response body as it streams past (chunks in order), with bounded memory.
///
/// JSON bodies are scanned incrementally for the top-level `usage` member, so a body of any size
/// (e.g. a large embeddings batch) is handled while keeping only that member. SSE bodies are split
/// into events across chunk boundaries (`\n`, `\r\n` or `\r` line endings, `data:` with or
/// without the space); each event's `usage` is taken when non-null, and the content of every
/// chunk is counted as it arrives, event by event (a streamed delta is usually one token, and
/// counting per event keeps no text around; the total can differ by a few tokens from
/// tokenizing the whole text at once).
pub struct UsageScanner {
    inner: Inner,
}

enum Inner {
    Json(JsonScan),
    Sse(SseScan),
}

impl fmt::Debug for UsageScanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Json(j) => f
                .debug_struct("UsageScanner")
                .field("kind", &"json")
                .field("state", &j.state)
                .field("usage", &j.usage)
                .finish_non_exhaustive(),
            Inner::Sse(s) => f
                .debug_struct("UsageScanner")
                .field("kind", &"sse")
                .field("encoding", &s.encoding)
                .field("usage", &s.usage)
                .field("chunks", &s.chunks)
                .field("completion_tokens", &s.completion_tokens)
                .finish_non_exhaustive(),
        }
    }
}

impl UsageScanner {
    /// `sse`: the response Content-Type is `text/event-stream`. `encoding`: for counting streamed
    /// content. `prompt_estimate`: used as prompt_tokens when the stream reports no usage.
    pub fn new(sse: bool, encoding: Encoding, prompt_estimate: u32) -> Self {
        let inner = if sse {
            Inner::Sse(SseScan::new(encoding, prompt_estimate))
        } else {
            Inner::Json(JsonScan::default())
        };
        UsageScanner { inner }
    }

    /// Feeds the next body chunk. Cheap: one pass over the bytes, no allocation per chunk beyond
    /// the bounded buffers; SSE content is tokenized per event.
    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.inner {
            Inner::Json(j) => j.feed(chunk),
            Inner::Sse(s) => s.feed(chunk),
        }
    }

    /// At end of body: JSON — the body's `usage` (Reported); SSE — the last non-null `usage`
    /// (Reported) or, if none, the prompt estimate plus the tokens of all `choices[].delta`
    /// content, refusal and tool/function-call text (chat) or `choices[].text` (completions)
    /// seen (Counted). `None` when there is nothing usable: a body without usage (e.g. an error),
    /// a body that is not a JSON object, or a stream with no completion chunk. Calling it again
    /// gives the same answer.
    pub fn finish(&mut self) -> Option<(Usage, UsageSource)> {
        match &mut self.inner {
            Inner::Json(j) => j.finish().map(|u| (u, UsageSource::Reported)),
            Inner::Sse(s) => s.finish(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JSON bodies
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum JsonState {
    /// Before the opening brace.
    #[default]
    Start,
    /// Inside the top-level object.
    Object,
    /// After the top-level object closed.
    Done,
    /// Not a JSON object: nothing to read.
    Invalid,
}

/// Where the scanner is within a member of the top-level object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Member {
    #[default]
    ExpectKey,
    InKey,
    AfterKey,
    InValue,
}

const USAGE_KEY: &[u8] = b"usage";
/// `key_matched` value once the key being read is known not to be `usage`.
const KEY_MISMATCH: usize = usize::MAX;

/// An incremental scanner that tracks strings and nesting just enough to find the top-level
/// `"usage"` member and copy its value.
#[derive(Default)]
struct JsonScan {
    state: JsonState,
    depth: u32,
    in_string: bool,
    escape: bool,
    member: Member,
    /// How many bytes of the current top-level key matched `usage` so far.
    key_matched: usize,
    capturing: bool,
    capture_too_big: bool,
    capture: Vec<u8>,
    usage: Option<Usage>,
}

impl JsonScan {
    fn feed(&mut self, chunk: &[u8]) {
        if matches!(self.state, JsonState::Done | JsonState::Invalid) {
            return;
        }
        // Start of the part of `chunk` that belongs to the captured value.
        let mut cap_from = self.capturing.then_some(0);
        let mut i = 0;
        while i < chunk.len() {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    i += 1;
                    continue;
                }
                let rest = &chunk[i..];
                let Some(off) = memchr2(b'"', b'\\', rest) else {
                    self.key_bytes(rest);
                    break;
                };
                self.key_bytes(&rest[..off]);
                if rest[off] == b'\\' {
                    self.escape = true;
                    self.key_matched = KEY_MISMATCH;
                } else {
                    self.in_string = false;
                    if self.depth == 1 && self.member == Member::InKey {
                        self.member = Member::AfterKey;
                    }
                }
                i += off + 1;
                continue;
            }
            let b = chunk[i];
            if self.state == JsonState::Start {
                match b {
                    b'{' => {
                        self.state = JsonState::Object;
                        self.depth = 1;
                    }
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    _ => {
                        self.state = JsonState::Invalid;
                        return;
                    }
                }
                i += 1;
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    if self.depth == 1 && self.member == Member::ExpectKey {
                        self.member = Member::InKey;
                        self.key_matched = 0;
                    }
                }
                b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                b'}' | b']' => {
                    self.depth -= 1; // depth >= 1 while in Object
                    if self.depth == 0 {
                        if let Some(from) = cap_from.take() {
                            self.capture_slice(&chunk[from..i]);
                            self.end_capture();
                        }
                        self.state = JsonState::Done;
                        return;
                    }
                }
                b':' if self.depth == 1 && self.member == Member::AfterKey => {
                    self.member = Member::InValue;
                    if self.key_matched == USAGE_KEY.len() {
                        self.capturing = true;
                        self.capture_too_big = false;
                        self.capture.clear();
                        cap_from = Some(i + 1);
                    }
                }
                b',' if self.depth == 1 => {
                    if let Some(from) = cap_from.take() {
                        self.capture_slice(&chunk[from..i]);
                        self.end_capture();
                    }
                    self.member = Member::ExpectKey;
                }
                _ => {}
            }
            i += 1;
        }
        if let Some(from) = cap_from {
            self.capture_slice(&chunk[from..]);
        }
    }

    /// Unescaped string bytes: matched against `usage` while reading a top-level key.
    fn key_bytes(&mut self, bytes: &[u8]) {
        if self.depth != 1 || self.member != Member::InKey || self.key_matched == KEY_MISMATCH {
            return;
        }
        let end = self.key_matched + bytes.len();
        self.key_matched = if end <= USAGE_KEY.len() && USAGE_KEY[self.key_matched..end] == *bytes {
            end
        } else {
            KEY_MISMATCH
        };
    }

    fn capture_slice(&mut self, bytes: &[u8]) {
        if self.capture_too_big {
            return;
        }
        if self.capture.len() + bytes.len() > MAX_USAGE_BYTES {
            self.capture_too_big = true;
            self.capture = Vec::new();
        } else {
            self.capture.extend_from_slice(bytes);
        }
    }

    /// The captured value is complete: parse it (a later `usage` member replaces an earlier one).
    fn end_capture(&mut self) {
        self.capturing = false;
        if !self.capture_too_big
            && let Ok(Some(raw)) = serde_json::from_slice::<Option<RawUsage>>(&self.capture)
            && let Some(u) = raw.into_usage()
        {
            self.usage = Some(u);
        }
        self.capture = Vec::new();
    }

    fn finish(&mut self) -> Option<Usage> {
        if self.state == JsonState::Invalid {
            return None;
        }
        if self.capturing {
            // The body ended inside the value (truncated): use it if it is complete anyway.
            self.end_capture();
        }
        self.usage
    }
}

// ---------------------------------------------------------------------------------------------
// SSE bodies
// ---------------------------------------------------------------------------------------------

/// One `chat.completion.chunk` / `text_completion` event, reduced to what is counted.
#[derive(Deserialize)]
struct StreamChunk {
    #[serde(default)]
    choices: Option<Vec<StreamChoice>>,
    #[serde(default)]
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct StreamChoice {
    #[serde(default)]
    delta: Option<Delta>,
    /// Legacy completions stream their text here.
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
    #[serde(default)]
    function_call: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

struct SseScan {
    encoding: Encoding,
    prompt_estimate: u32,
    /// The incomplete last line of the previous chunk.
    line: Vec<u8>,
    /// The current line outgrew the cap: its event is dropped.
    line_too_big: bool,
    /// The previous chunk ended with `\r`: a leading `\n` belongs to that line ending.
    skip_lf: bool,
    /// The current event's `data` (lines joined with `\n`).
    data: Vec<u8>,
    has_data: bool,
    data_too_big: bool,
    /// The last non-null usage seen.
    usage: Option<Usage>,
    /// Events that parsed as completion chunks (objects with `choices`).
    chunks: u64,
    completion_tokens: u64,
}

impl SseScan {
    fn new(encoding: Encoding, prompt_estimate: u32) -> Self {
        SseScan {
            encoding,
            prompt_estimate,
            line: Vec::new(),
            line_too_big: false,
            skip_lf: false,
            data: Vec::new(),
            has_data: false,
            data_too_big: false,
            usage: None,
            chunks: 0,
            completion_tokens: 0,
        }
    }

    fn feed(&mut self, mut rest: &[u8]) {
        if self.skip_lf && !rest.is_empty() {
            self.skip_lf = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while let Some(pos) = memchr2(b'\n', b'\r', rest) {
            if self.line.is_empty() && !self.line_too_big {
                self.line_done(&rest[..pos]);
            } else {
                self.push_line(&rest[..pos]);
                let line = std::mem::take(&mut self.line);
                self.line_done(&line);
                self.line = line;
                self.line.clear();
            }
            let mut next = pos + 1;
            if rest[pos] == b'\r' {
                if next == rest.len() {
                    self.skip_lf = true;
                } else if rest[next] == b'\n' {
                    next += 1;
                }
            }
            rest = &rest[next..];
        }
        self.push_line(rest);
    }

    fn push_line(&mut self, bytes: &[u8]) {
        if self.line_too_big {
            return;
        }
        if self.line.len() + bytes.len() > MAX_EVENT_BYTES {
            self.line_too_big = true;
            self.line = Vec::new();
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    /// One complete line (without its terminator).
    fn line_done(&mut self, line: &[u8]) {
        if std::mem::take(&mut self.line_too_big) {
            self.data_too_big = true;
            return;
        }
        if line.is_empty() {
            self.dispatch();
            return;
        }
        let value = if line == b"data" {
            &b""[..]
        } else if let Some(v) = line.strip_prefix(b"data:") {
            v.strip_prefix(b" ").unwrap_or(v)
        } else {
            return; // comments, event:, id:, retry:
        };
        if self.data_too_big {
            return;
        }
        let extra = usize::from(self.has_data) + value.len();
        if self.data.len() + extra > MAX_EVENT_BYTES {
            self.data_too_big = true;
            self.data = Vec::new();
            return;
        }
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
        self.has_data = true;
    }

    /// End of an event: handle its data.
    fn dispatch(&mut self) {
        if self.has_data && !self.data_too_big {
            let data = std::mem::take(&mut self.data);
            self.event(&data);
            self.data = data;
        }
        self.data.clear();
        self.has_data = false;
        self.data_too_big = false;
    }

    fn event(&mut self, data: &[u8]) {
        let payload = data.trim_ascii();
        if payload.first() != Some(&b'{') {
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<StreamChunk>(payload) else {
            return;
        };
        if let Some(u) = chunk.usage.and_then(RawUsage::into_usage) {
            self.usage = Some(u);
        }
        let Some(choices) = chunk.choices else {
            return;
        };
        self.chunks += 1;
        for choice in choices {
            if let Some(text) = choice.text {
                self.add(&text);
            }
            let Some(delta) = choice.delta else {
                continue;
            };
            for text in [delta.content, delta.refusal].into_iter().flatten() {
                self.add(&text);
            }
            let calls = delta
                .tool_calls
                .into_iter()
                .flatten()
                .filter_map(|c| c.function);
            for f in calls.chain(delta.function_call) {
                for text in [f.name, f.arguments].into_iter().flatten() {
                    self.add(&text);
                }
            }
        }
    }

    fn add(&mut self, text: &str) {
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(count(self.encoding, text));
    }

    fn finish(&mut self) -> Option<(Usage, UsageSource)> {
        // Be lenient with a stream that ends without the final blank line.
        if !self.line.is_empty() || self.line_too_big {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line);
        }
        self.skip_lf = false;
        self.dispatch();
        if let Some(u) = self.usage {
            return Some((u, UsageSource::Reported));
        }
        if self.chunks == 0 {
            return None;
        }
        let prompt_tokens = u64::from(self.prompt_estimate);
        Some((
            Usage {
                prompt_tokens,
                completion_tokens: self.completion_tokens,
                total_tokens: prompt_tokens.saturating_add(self.completion_tokens),
            },
            UsageSource::Counted,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::count_text;

    const ENC: Encoding = Encoding::O200kBase;

    fn scan_chunks(sse: bool, chunks: &[&[u8]], prompt: u32) -> Option<(Usage, UsageSource)> {
        let mut s = UsageScanner::new(sse, ENC, prompt);
        for c in chunks {
            s.feed(c);
        }
        let first = s.finish();
        assert_eq!(s.finish(), first, "finish is repeatable");
        first
    }

    /// The result of feeding `body` whole, split in two at every byte, and byte by byte — which
    /// must all agree.
    fn scan_all_ways(sse: bool, body: &[u8], prompt: u32) -> Option<(Usage, UsageSource)> {
        let whole = scan_chunks(sse, &[body], prompt);
        for at in 0..=body.len() {
            let (a, b) = body.split_at(at);
            assert_eq!(scan_chunks(sse, &[a, b], prompt), whole, "split at {at}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(scan_chunks(sse, &bytes, prompt), whole, "byte by byte");
        whole
    }

    fn usage(p: u64, c: u64, t: u64) -> Usage {
        Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: t,
        }
    }

    const CHAT_BODY: &str = r#"{"choices":[{"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}},"finish_reason":"stop","index":0,"logprobs":null,"message":{"content":"A \"usage\": {\"prompt_tokens\": 1} string, braces }}} and \\ backslashes ]\\","refusal":null,"role":"assistant"}}],"created":1727000000,"id":"chatcmpl-A1","model":"gpt-4o-2024-08-06","object":"chat.completion","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}],"system_fingerprint":"fp_1","usage":{"completion_tokens":17,"completion_tokens_details":{"reasoning_tokens":0},"prompt_tokens":25,"prompt_tokens_details":{"cached_tokens":0},"total_tokens":42}}"#;

    #[test]
    fn json_body_usage_at_every_split() {
        assert_eq!(
            scan_all_ways(false, CHAT_BODY.as_bytes(), 999),
            Some((usage(25, 17, 42), UsageSource::Reported))
        );
    }

    #[test]
    fn json_usage_in_the_middle_with_whitespace() {
        let body = b"\r\n  {\n  \"usage\" : { \"prompt_tokens\" : 3 , \"total_tokens\" : 3 } ,\n  \"object\": \"list\", \"data\": [ {\"usage\": {\"prompt_tokens\": 99}} ]\n}\n";
        assert_eq!(
            scan_all_ways(false, body, 0),
            Some((usage(3, 0, 3), UsageSource::Reported))
        );
    }

    #[test]
    fn json_nested_or_quoted_usage_is_ignored() {
        let body = br#"{"data":{"usage":{"prompt_tokens":5}},"note":"\"usage\":{\"prompt_tokens\":7}","usagex":{"prompt_tokens":8},"us\u0061ge":{"prompt_tokens":9}}"#;
        assert_eq!(scan_all_ways(false, body, 0), None);
    }

    #[test]
    fn json_other_shapes() {
        // Embeddings: no completion tokens.
        let emb = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-0.2,3e-5]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        assert_eq!(
            scan_chunks(false, &[emb], 0),
            Some((usage(8, 0, 8), UsageSource::Reported))
        );
        // Responses API naming; total computed when absent.
        let resp = br#"{"id":"resp_1","output":[],"usage":{"input_tokens":4,"output_tokens":6}}"#;
        assert_eq!(
            scan_chunks(false, &[resp], 0),
            Some((usage(4, 6, 10), UsageSource::Reported))
        );
        // Error bodies, null or empty usage, non-objects: nothing usable.
        for body in [
            &br#"{"error":{"code":"429","message":"Rate limit is exceeded."}}"#[..],
            br#"{ "statusCode": 401, "message": "Access denied" }"#,
            br#"{"usage":null}"#,
            br#"{"usage":{}}"#,
            br#"{"usage":"lots"}"#,
            br#"[{"usage":{"prompt_tokens":1}}]"#,
            b"<html>Bad gateway</html>",
            b"",
            b"   ",
        ] {
            assert_eq!(scan_all_ways(false, body, 5), None, "{body:?}");
        }
    }

    #[test]
    fn json_truncated_after_usage_still_reports() {
        let body =
            br#"{"id":"x","usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}"#;
        assert_eq!(
            scan_chunks(false, &[body], 0),
            Some((usage(2, 3, 5), UsageSource::Reported))
        );
        let cut = br#"{"id":"x","usage":{"prompt_tokens":2,"compl"#;
        assert_eq!(scan_chunks(false, &[cut], 0), None);
    }

    #[test]
    fn json_large_body_keeps_little() {
        // A 3 MiB embeddings-like body, usage at the end, fed in 8 KiB chunks.
        let mut body = br#"{"object":"list","data":[{"embedding":""#.to_vec();
        body.extend(std::iter::repeat_n(b'A', 3 << 20));
        body.extend_from_slice(br#""},{"embedding":["#);
        for i in 0..100_000 {
            body.extend_from_slice(format!("{}.{i},", i % 7).as_bytes());
        }
        body.extend_from_slice(br#"0]}],"usage":{"prompt_tokens":11,"total_tokens":11}}"#);
        let mut s = UsageScanner::new(false, ENC, 0);
        for c in body.chunks(8192) {
            s.feed(c);
            let Inner::Json(j) = &s.inner else {
                unreachable!()
            };
            assert!(j.capture.capacity() <= MAX_USAGE_BYTES);
        }
        assert_eq!(s.finish(), Some((usage(11, 0, 11), UsageSource::Reported)));
    }

    #[test]
    fn json_oversized_usage_is_dropped() {
        let mut body = br#"{"usage":{"prompt_tokens":1,"pad":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', MAX_USAGE_BYTES));
        body.extend_from_slice(br#""}}"#);
        assert_eq!(scan_chunks(false, &[&body], 0), None);
    }

    /// Azure's first event of every chat stream (content filtering on).
    const AZURE_FIRST: &str = r#"data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"jailbreak":{"filtered":false,"detected":false},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}]}"#;

    fn chat_event(delta: &str, usage_null: bool) -> String {
        let usage = if usage_null { r#","usage":null"# } else { "" };
        format!(
            r#"data: {{"choices":[{{"content_filter_results":{{}},"delta":{delta},"finish_reason":null,"index":0,"logprobs":null}}],"created":1727000000,"id":"chatcmpl-A1","model":"gpt-4o-2024-08-06","object":"chat.completion.chunk","system_fingerprint":"fp_1"{usage}}}"#
        )
    }

    const WORDS: [&str; 4] = ["Hello", " there", ",", " friend!"];

    /// An Azure-shaped chat stream, with or without the usage chunk, joined by `eol`.
    fn chat_stream(include_usage: bool, eol: &str) -> String {
        let mut events = vec![
            AZURE_FIRST.to_string(),
            chat_event(
                r#"{"content":"","refusal":null,"role":"assistant"}"#,
                include_usage,
            ),
        ];
        for w in WORDS {
            let delta = serde_json::json!({ "content": w }).to_string();
            events.push(chat_event(&delta, include_usage));
        }
        events.push(
            chat_event("{}", include_usage)
                .replace(r#""finish_reason":null"#, r#""finish_reason":"stop""#),
        );
        if include_usage {
            events.push(
                r#"data: {"choices":[],"created":1727000000,"id":"chatcmpl-A1","model":"gpt-4o-2024-08-06","object":"chat.completion.chunk","usage":{"completion_tokens":4,"prompt_tokens":9,"total_tokens":13}}"#
                    .to_string(),
            );
        }
        events.push("data: [DONE]".to_string());
        let mut s = String::new();
        for e in events {
            s.push_str(&e);
            s.push_str(eol);
            s.push_str(eol);
        }
        s
    }

    fn words_tokens() -> u64 {
        WORDS.iter().map(|w| u64::from(count_text(ENC, w))).sum()
    }

    #[test]
    fn sse_usage_chunk_is_reported() {
        for eol in ["\n", "\r\n", "\r"] {
            assert_eq!(
                scan_all_ways(true, chat_stream(true, eol).as_bytes(), 100),
                Some((usage(9, 4, 13), UsageSource::Reported)),
                "{eol:?}"
            );
        }
    }

    #[test]
    fn sse_without_usage_is_counted_per_event() {
        let counted = words_tokens();
        assert!(counted >= WORDS.len() as u64);
        for eol in ["\n", "\r\n", "\r"] {
            assert_eq!(
                scan_all_ways(true, chat_stream(false, eol).as_bytes(), 100),
                Some((usage(100, counted, 100 + counted), UsageSource::Counted)),
                "{eol:?}"
            );
        }
    }

    #[test]
    fn sse_only_the_first_event_counts_the_prompt() {
        // A stream cut after Azure's first event still charges the prompt estimate.
        let body = format!("{AZURE_FIRST}\n\n");
        assert_eq!(
            scan_chunks(true, &[body.as_bytes()], 7),
            Some((usage(7, 0, 7), UsageSource::Counted))
        );
    }

    #[test]
    fn sse_data_without_space_comments_and_fields() {
        let body = concat!(
            ": keep-alive comment\n",
            "event: message\nid: 1\nretry: 1000\n",
            "data:{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hello world\"}}]}\n\n",
            "data:{\"choices\":[{\"index\":0,\"delta\":{\"content\":\" again\"}}]}\n",
        ); // no final blank line: taken at finish
        assert_eq!(
            scan_all_ways(true, body.as_bytes(), 1),
            Some((usage(1, 2 + 1, 4), UsageSource::Counted))
        );
    }

    #[test]
    fn sse_multi_line_data_is_joined() {
        let body = "data: {\"choices\":[{\"index\":0,\ndata: \"delta\":{\"content\":\"hello world\"}}]}\n\n";
        assert_eq!(
            scan_all_ways(true, body.as_bytes(), 0),
            Some((usage(0, 2, 2), UsageSource::Counted))
        );
    }

    #[test]
    fn sse_legacy_completions_and_tool_calls() {
        let c = |s: &str| u64::from(count_text(ENC, s));
        let completions = concat!(
            "data: {\"choices\":[{\"text\":\"Once upon\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}],\"object\":\"text_completion\"}\n\n",
            "data: {\"choices\":[{\"text\":\" a time\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"length\"}],\"object\":\"text_completion\"}\n\n",
            "data: [DONE]\n\n",
        );
        assert_eq!(
            scan_chunks(true, &[completions.as_bytes()], 2),
            Some((
                usage(
                    2,
                    c("Once upon") + c(" a time"),
                    2 + c("Once upon") + c(" a time")
                ),
                UsageSource::Counted
            ))
        );
        let tools = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"function_call\":{\"arguments\":\"\\\"Oslo\\\"}\"}}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"refusal\":\"No.\"}}]}\n\n",
        );
        let expected = c("get_weather") + c("{\"city\":") + c("\"Oslo\"}") + c("No.");
        assert_eq!(
            scan_chunks(true, &[tools.as_bytes()], 0),
            Some((usage(0, expected, expected), UsageSource::Counted))
        );
    }

    #[test]
    fn sse_last_non_null_usage_wins() {
        let body = concat!(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":6,\"total_tokens\":11}}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}],\"usage\":null}\n\n",
            "data: [DONE]\n\n",
        );
        assert_eq!(
            scan_chunks(true, &[body.as_bytes()], 0),
            Some((usage(5, 6, 11), UsageSource::Reported))
        );
    }

    #[test]
    fn sse_errors_and_garbage_give_nothing() {
        for body in [
            &b"data: {\"error\":{\"code\":\"content_filter\",\"message\":\"filtered\"}}\n\n"[..],
            b"data: [DONE]\n\n",
            b"data: not json\n\n",
            b"data: {\"choices\": 5}\n\n",
            b"",
            b"\n\n\n\r\n\r\r",
            b"\xff\xfe\x00data: {",
        ] {
            assert_eq!(scan_all_ways(true, body, 3), None, "{body:?}");
        }
    }

    #[test]
    fn sse_oversized_event_is_skipped() {
        let mut body = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"".to_vec();
        body.extend(std::iter::repeat_n(b'x', MAX_EVENT_BYTES));
        body.extend_from_slice(b"\"}}]}\n\n");
        body.extend_from_slice(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hello world\"}}]}\n\n",
        );
        let mut s = UsageScanner::new(true, ENC, 0);
        for c in body.chunks(4096) {
            s.feed(c);
        }
        let Inner::Sse(sse) = &s.inner else {
            unreachable!()
        };
        assert!(sse.line.capacity() <= MAX_EVENT_BYTES && sse.data.capacity() <= MAX_EVENT_BYTES);
        assert_eq!(s.finish(), Some((usage(0, 2, 2), UsageSource::Counted)));
        // Same with many data lines adding up past the cap.
        let mut body = Vec::new();
        let line = format!("data: {}\n", "y".repeat(1000));
        for _ in 0..(MAX_EVENT_BYTES / 1000 + 2) {
            body.extend_from_slice(line.as_bytes());
        }
        body.extend_from_slice(b"\ndata: {\"choices\":[]}\n\n");
        assert_eq!(
            scan_chunks(true, &[&body], 4),
            Some((usage(4, 0, 4), UsageSource::Counted))
        );
    }

    #[test]
    fn debug_shows_no_content() {
        let mut s = UsageScanner::new(true, ENC, 0);
        s.feed(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"secret-ish text\"}}]}\n\ndata: {\"partial");
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("secret-ish") && !dbg.contains("partial"),
            "{dbg}"
        );
        assert!(dbg.contains("sse"));
        let mut j = UsageScanner::new(false, ENC, 0);
        j.feed(CHAT_BODY.as_bytes());
        let dbg = format!("{j:?}");
        assert!(
            !dbg.contains("backslashes") && dbg.contains("json"),
            "{dbg}"
        );
    }
}
