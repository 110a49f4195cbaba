//! Usage read from a response body as it streams past, with bounded memory.

use std::borrow::Cow;
use std::fmt;

use memchr::memchr2;
use serde::Deserialize;

use crate::Encoding;
use crate::count::count;
use crate::lenient::{Code, Detail, Text};

mod fast_event;

/// The largest `usage` value (JSON bodies) kept for parsing; real ones are a few hundred bytes.
const MAX_USAGE_BYTES: usize = 64 * 1024;
/// The largest SSE line or event payload kept for parsing; a larger event is skipped.
const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// The longest object id kept (bytes, after unescaping); a longer one is ignored.
const MAX_ID_BYTES: usize = 256;
/// The longest raw JSON text of a top-level `id` value kept for parsing (quotes, whitespace and
/// escapes included).
const MAX_ID_CAPTURE: usize = 2 * MAX_ID_BYTES;
/// The longest failure code kept (bytes); a longer one is cut at a character boundary.
const MAX_CODE_BYTES: usize = 64;

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

/// What kind of failure a stream reported after its 200 status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFailureKind {
    /// An error event: a chat/completions event with a top-level `error` object, or a Responses
    /// `error` event.
    Error,
    /// A Responses `response.failed` event.
    Failed,
    /// A Responses `response.incomplete` event (e.g. the output hit `max_output_tokens`, or a
    /// content filter stopped it).
    Incomplete,
}

/// A failure seen inside a stream that had started with a 200 status.
///
/// Only a short machine-readable code is kept, never the message: messages may quote the
/// request's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamFailure {
    /// What kind of failure.
    pub kind: StreamFailureKind,
    /// The error's `code` (for [`StreamFailureKind::Incomplete`], the
    /// `incomplete_details.reason`), when it is a string or an integer; cut to at most 64 bytes
    /// at a character boundary.
    pub code: Option<String>,
}

/// A `usage` object as the backend sends it. The Responses API's `input_tokens`/`output_tokens`
/// are accepted as aliases.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
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
/// JSON bodies are scanned incrementally for the top-level `usage` and `id` members, so a body of
/// any size (e.g. a large embeddings batch) is handled while keeping only those members. SSE
/// bodies are split into events across chunk boundaries (`\n`, `\r\n` or `\r` line endings,
/// `data:` with or without the space); each event's `usage` is taken when non-null. The generated
/// text is gathered and counted in batches of up to 2 KiB (each kind of text apart: content,
/// refusal, function names, arguments), and the last batch only when the stream reported no
/// usage: a stream that reports its usage is never tokenized, and per event the scan keeps and
/// allocates nothing new.
///
/// Streams may be chat/completions chunks or Responses API events (which carry a `type`); for
/// the latter the usage is the one nested in the final `response.completed` (or
/// `response.incomplete` / `response.failed`) event's `response`, and the counted fallback counts
/// the `delta` of `response.output_text.delta`, `response.refusal.delta` and
/// `response.function_call_arguments.delta` events. Each event is parsed once, into one struct
/// that borrows its strings from the event: by a hand-written reader for the shapes streams carry
/// by the hundred (chunks, deltas), by serde for the rest (see `fast_event`).
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
                .field("object_id", &j.id)
                .finish_non_exhaustive(),
            Inner::Sse(s) => f
                .debug_struct("UsageScanner")
                .field("kind", &"sse")
                .field("encoding", &s.encoding)
                .field("usage", &s.usage)
                .field("chunks", &s.chunks)
                .field("completion_tokens", &s.completion_tokens)
                .field("object_id", &s.id)
                .field("failure", &s.failure)
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

    /// [`UsageScanner::new`] for a JSON answer whose `id` nobody will ask for
    /// ([`UsageScanner::object_id`] then answers `None`): only the usage is read.
    pub fn usage_only(sse: bool, encoding: Encoding, prompt_estimate: u32) -> Self {
        let mut scanner = UsageScanner::new(sse, encoding, prompt_estimate);
        if let Inner::Json(j) = &mut scanner.inner {
            j.skip_id = true;
        }
        scanner
    }

    /// Feeds the next body chunk. Cheap: one pass over the bytes, no allocation per chunk beyond
    /// the bounded buffers; SSE text is tokenized in batches, only when it may be needed.
    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.inner {
            Inner::Json(j) => j.feed(chunk),
            Inner::Sse(s) => s.feed(chunk),
        }
    }

    /// At end of body: JSON — the body's `usage` (Reported); SSE — the last non-null `usage`,
    /// top-level or in a Responses event's `response` (Reported) or, if none, the prompt
    /// estimate plus the tokens of all `choices[].delta` content, refusal and tool/function-call
    /// text (chat), `choices[].text` (completions) or Responses text/refusal/argument deltas
    /// seen (Counted). `None` when there is nothing usable: a body without usage (e.g. an error),
    /// a body that is not a JSON object, or a stream with no completion chunk and no `response.*`
    /// event. Calling it again gives the same answer.
    pub fn finish(&mut self) -> Option<(Usage, UsageSource)> {
        match &mut self.inner {
            Inner::Json(j) => j.finish().map(|u| (u, UsageSource::Reported)),
            Inner::Sse(s) => s.finish(),
        }
    }

    /// The first failure a stream reported so far (see [`StreamFailure`]); always `None` for a
    /// JSON body (a failed call answers with an error status instead). Events are read as they
    /// complete; an event cut off at the end of the body is read by [`UsageScanner::finish`].
    pub fn failure(&self) -> Option<&StreamFailure> {
        match &self.inner {
            Inner::Json(_) => None,
            Inner::Sse(s) => s.failure.as_ref(),
        }
    }

    /// The id of the object the call created, once seen: for a JSON body its top-level `id`
    /// member when that is a non-empty string of at most 256 bytes (the first such member); for a
    /// stream the `response.id` of the first Responses event that has one (`response.created`),
    /// else the top-level `id` of the first chat/completions chunk that has a non-empty one
    /// (Azure's first chunk has `"id": ""`). Ids longer than 256 bytes are ignored.
    pub fn object_id(&self) -> Option<&str> {
        match &self.inner {
            Inner::Json(j) => j.id.as_deref(),
            Inner::Sse(s) => s.id.as_deref(),
        }
    }
}

/// `code` as kept in a [`StreamFailure`]: at most [`MAX_CODE_BYTES`], cut at a char boundary.
pub(crate) fn short_code(code: &str) -> String {
    let mut end = code.len().min(MAX_CODE_BYTES);
    while !code.is_char_boundary(end) {
        end -= 1;
    }
    code[..end].to_owned()
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

/// The longest top-level key the JSON scanner looks for (`usage`).
const KEY_CAP: usize = 5;
/// `key_len` once the key being read is known to be none of the wanted ones.
const KEY_MISMATCH: usize = usize::MAX;

/// A top-level member whose value the JSON scanner copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Usage,
    Id,
}

impl Target {
    fn of_key(key: &[u8]) -> Option<Target> {
        match key {
            b"usage" => Some(Target::Usage),
            b"id" => Some(Target::Id),
            _ => None,
        }
    }

    /// The most raw JSON text kept for this member's value.
    fn cap(self) -> usize {
        match self {
            Target::Usage => MAX_USAGE_BYTES,
            Target::Id => MAX_ID_CAPTURE,
        }
    }
}

/// An incremental scanner that tracks strings and nesting just enough to find the top-level
/// `"usage"` and `"id"` members and copy their values.
#[derive(Default)]
struct JsonScan {
    state: JsonState,
    depth: u32,
    in_string: bool,
    escape: bool,
    member: Member,
    /// The current top-level key so far (its first `key_len` bytes), or [`KEY_MISMATCH`] once it
    /// is too long or has an escape.
    key: [u8; KEY_CAP],
    key_len: usize,
    /// The member whose value is being copied.
    capturing: Option<Target>,
    capture_too_big: bool,
    capture: Vec<u8>,
    usage: Option<Usage>,
    id: Option<String>,
    /// The `id` member is not wanted: never captured.
    skip_id: bool,
}

impl JsonScan {
    fn feed(&mut self, chunk: &[u8]) {
        if matches!(self.state, JsonState::Done | JsonState::Invalid) {
            return;
        }
        // Start of the part of `chunk` that belongs to the captured value.
        let mut cap_from = self.capturing.map(|_| 0);
        let mut i = 0;
        while i < chunk.len() {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    i += 1;
                    continue;
                }
                let rest = &chunk[i..];
                let end = crate::json_walk::quote_or_backslash(rest);
                // `InKey` only while reading a top-level key (depth 1).
                if self.member == Member::InKey {
                    self.key_bytes(&rest[..end.unwrap_or(rest.len())]);
                }
                let Some(off) = end else {
                    break;
                };
                if rest[off] == b'\\' {
                    self.escape = true;
                    self.key_len = KEY_MISMATCH;
                } else {
                    self.in_string = false;
                    if self.member == Member::InKey {
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
                        self.key_len = 0;
                    }
                }
                b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                b'}' | b']' => {
                    self.depth -= 1; // depth >= 1 while in Object
                    if self.depth == 0 {
                        if let Some(from) = cap_from.take() {
                            self.end_capture_with(&chunk[from..i]);
                        }
                        self.state = JsonState::Done;
                        return;
                    }
                }
                b':' if self.depth == 1 && self.member == Member::AfterKey => {
                    self.member = Member::InValue;
                    let target = self.key.get(..self.key_len).and_then(Target::of_key);
                    if target == Some(Target::Usage)
                        || (target == Some(Target::Id) && self.id.is_none() && !self.skip_id)
                    {
                        self.capturing = target;
                        self.capture_too_big = false;
                        self.capture.clear();
                        cap_from = Some(i + 1);
                    }
                }
                b',' if self.depth == 1 => {
                    if let Some(from) = cap_from.take() {
                        self.end_capture_with(&chunk[from..i]);
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

    /// Unescaped bytes of the top-level key being read: collected (short keys only).
    fn key_bytes(&mut self, bytes: &[u8]) {
        if self.key_len == KEY_MISMATCH {
            return;
        }
        let end = self.key_len + bytes.len();
        if end <= KEY_CAP {
            self.key[self.key_len..end].copy_from_slice(bytes);
            self.key_len = end;
        } else {
            self.key_len = KEY_MISMATCH;
        }
    }

    fn capture_slice(&mut self, bytes: &[u8]) {
        let Some(target) = self.capturing else {
            return;
        };
        if self.capture_too_big {
            return;
        }
        if self.capture.len() + bytes.len() > target.cap() {
            self.capture_too_big = true;
            self.capture = Vec::new();
        } else {
            self.capture.extend_from_slice(bytes);
        }
    }

    /// The captured value ends with `tail`. A value that lies whole in one chunk (nothing
    /// captured before `tail`: the usual case) is parsed where it lies, without a copy.
    fn end_capture_with(&mut self, tail: &[u8]) {
        match self.capturing {
            Some(target) if self.capture.is_empty() && !self.capture_too_big => {
                self.capturing = None;
                if tail.len() <= target.cap() {
                    self.take_value(target, tail);
                }
            }
            _ => {
                self.capture_slice(tail);
                self.end_capture();
            }
        }
    }

    /// The captured value is complete: parse it (a later `usage` member replaces an earlier one;
    /// the first usable `id` is kept).
    fn end_capture(&mut self) {
        let target = self.capturing.take();
        let captured = std::mem::take(&mut self.capture);
        if !self.capture_too_big
            && let Some(target) = target
        {
            self.take_value(target, &captured);
        }
    }

    /// Reads a member's whole raw value.
    fn take_value(&mut self, target: Target, raw: &[u8]) {
        match target {
            Target::Usage => {
                // The reader walks the usual object; serde reads any other.
                let read = fast_event::read_usage(raw)
                    .or_else(|| serde_json::from_slice::<Option<RawUsage>>(raw).ok());
                if let Some(Some(raw)) = read
                    && let Some(u) = raw.into_usage()
                {
                    self.usage = Some(u);
                }
            }
            Target::Id => {
                if let Ok(id) = serde_json::from_slice::<String>(raw)
                    && usable_id(&id)
                {
                    self.id = Some(id);
                }
            }
        }
    }

    fn finish(&mut self) -> Option<Usage> {
        if self.state == JsonState::Invalid {
            return None;
        }
        if self.capturing.is_some() {
            // The body ended inside the value (truncated): use it if it is complete anyway.
            self.end_capture();
        }
        self.usage
    }
}

/// An id worth keeping: non-empty and at most [`MAX_ID_BYTES`].
fn usable_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES
}

// ---------------------------------------------------------------------------------------------
// SSE bodies
// ---------------------------------------------------------------------------------------------

/// One streamed event, reduced to what is read: a `chat.completion.chunk` / `text_completion`
/// (no `type`), or a Responses API event (`type`, and `delta` or `response` as the type has).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
struct StreamEvent<'a> {
    /// Responses events only.
    #[serde(default, rename = "type", borrow)]
    kind: Text<'a>,
    #[serde(default, borrow)]
    choices: Option<Choices<'a>>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default, borrow)]
    id: Text<'a>,
    /// A chat/completions error event's `error` (Responses `error` events may have one too).
    #[serde(default, borrow)]
    error: Detail<'a>,
    /// A Responses `error` event's code.
    #[serde(default, borrow)]
    code: Code<'a>,
    /// A Responses `*.delta` event's text.
    #[serde(default, borrow)]
    delta: Text<'a>,
    /// The response, in Responses `response.*` lifecycle events.
    #[serde(default, borrow)]
    response: Option<ResponseObject<'a>>,
}

/// The `response` of a Responses lifecycle event (`response.created` … `response.completed`).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
struct ResponseObject<'a> {
    #[serde(default, borrow)]
    id: Text<'a>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default, borrow)]
    error: Detail<'a>,
    #[serde(default, borrow)]
    incomplete_details: Detail<'a>,
}

/// Generated text is counted when this much has gathered (and at the end of the stream).
const COUNT_BATCH: usize = 2048;

/// The kinds of generated text, each counted as one text of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TextKind {
    Content,
    Refusal,
    FunctionName,
    Arguments,
}

/// Responses event types whose `delta` is generated text, counted for the fallback, and the
/// kind of text each carries.
const COUNTED_DELTAS: [(&str, TextKind); 3] = [
    ("response.output_text.delta", TextKind::Content),
    ("response.refusal.delta", TextKind::Refusal),
    (
        "response.function_call_arguments.delta",
        TextKind::Arguments,
    ),
];

/// A chunk's `choices`. Streams almost always carry one choice per chunk: it is kept inline, so
/// reading a chunk allocates nothing; more (`n` > 1) go to a vector.
#[cfg_attr(test, derive(Debug, PartialEq))]
struct Choices<'a> {
    first: Option<StreamChoice<'a>>,
    rest: Vec<StreamChoice<'a>>,
}

impl<'a> IntoIterator for Choices<'a> {
    type Item = StreamChoice<'a>;
    type IntoIter = std::iter::Chain<
        std::option::IntoIter<StreamChoice<'a>>,
        std::vec::IntoIter<StreamChoice<'a>>,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.first.into_iter().chain(self.rest)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Choices<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Choices<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of choices")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let first = seq.next_element()?;
                let mut rest = Vec::new();
                while let Some(c) = seq.next_element()? {
                    rest.push(c);
                }
                Ok(Choices { first, rest })
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

// The texts are borrowed from the event (copied only when they hold escapes).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
struct StreamChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    /// Legacy completions stream their text here.
    #[serde(default, borrow)]
    text: Text<'a>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Text<'a>,
    #[serde(default, borrow)]
    refusal: Text<'a>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
    #[serde(default, borrow)]
    function_call: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
struct ToolCallDelta<'a> {
    #[serde(default, borrow)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(Debug, PartialEq))]
struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    name: Text<'a>,
    #[serde(default, borrow)]
    arguments: Text<'a>,
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
    /// Events that parsed as completion chunks (objects with `choices`) or as Responses
    /// `response.*` events.
    chunks: u64,
    /// Tokens of the generated text counted so far (the fallback when no usage is reported).
    completion_tokens: u64,
    /// Generated text not counted yet: counted in batches of [`COUNT_BATCH`] bytes, and at the
    /// end only if the stream reported no usage (it usually does: the count is then never
    /// needed). Its capacity is kept, so streaming text allocates nothing per event.
    pending: String,
    /// Which text `pending` holds: texts of different kinds (content, refusal, a function's
    /// name, its arguments) are counted apart.
    pending_kind: TextKind,
    /// The first failure reported.
    failure: Option<StreamFailure>,
    /// The object id (see [`UsageScanner::object_id`]), and whether it came from a Responses
    /// event (which is final; a chat chunk's id is kept only until a Responses id turns up).
    id: Option<String>,
    id_is_final: bool,
    /// The last chunk read whose only text is its one choice's `delta.content`, without
    /// escapes, and where in it that content lies (see [`SseScan::same_but_content`]).
    last_chunk: Vec<u8>,
    last_content: Option<(usize, usize)>,
}

/// The longest chunk kept in [`SseScan::last_chunk`].
const MAX_LAST_CHUNK: usize = 4096;

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
            pending: String::new(),
            pending_kind: TextKind::Content,
            failure: None,
            id: None,
            id_is_final: false,
            last_chunk: Vec::new(),
            last_content: None,
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
            if self.line.is_empty() {
                // Nothing carried over (or a line too big, which `line_done` drops).
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
        if let Some(content) = self.same_but_content(payload) {
            // What reading it would do (see `same_but_content`).
            self.chunks += 1;
            self.add(TextKind::Content, content);
            return;
        }
        // Most events are read by the hand-written reader; the few it leaves go to serde.
        let mut chunk = match fast_event::read(payload) {
            Some(chunk) => {
                self.remember(payload, &chunk);
                chunk
            }
            None => match serde_json::from_slice::<StreamEvent<'_>>(payload) {
                Ok(chunk) => chunk,
                Err(_) => return,
            },
        };
        if let Some(u) = chunk.usage.take().and_then(RawUsage::into_usage) {
            self.usage = Some(u);
        }
        self.note_failure(&chunk);
        self.note_id(&chunk);
        if let Some(kind) = chunk.kind.as_str() {
            self.responses_event(kind, chunk.delta.as_str(), chunk.response);
        }
        let Some(choices) = chunk.choices else {
            return;
        };
        self.chunks += 1;
        for choice in choices {
            if let Some(text) = choice.text.as_str() {
                self.add(TextKind::Content, text);
            }
            let Some(delta) = choice.delta else {
                continue;
            };
            for (kind, text) in [
                (TextKind::Content, &delta.content),
                (TextKind::Refusal, &delta.refusal),
            ] {
                if let Some(text) = text.as_str() {
                    self.add(kind, text);
                }
            }
            let calls = delta
                .tool_calls
                .into_iter()
                .flatten()
                .filter_map(|c| c.function);
            for f in calls.chain(delta.function_call) {
                for (kind, text) in [
                    (TextKind::FunctionName, &f.name),
                    (TextKind::Arguments, &f.arguments),
                ] {
                    if let Some(text) = text.as_str() {
                        self.add(kind, text);
                    }
                }
            }
        }
    }

    /// The content of `payload` when it is the last remembered chunk with only its content
    /// changed: the same bytes before and after the content, and a content of plain string bytes
    /// (no quote, backslash or control character) that is valid UTF-8.
    ///
    /// Such a chunk is valid JSON of the same shape as the remembered one, which was read in
    /// full, so reading it would find the same members with only `delta.content` changed: no
    /// usage, failure or type; an id read before (the remembered chunk's, which gave
    /// [`SseScan::note_id`] its chance); one choice whose only text is the content. Reading it
    /// would count one chunk and add its content, which is all the caller does. In a chat stream
    /// every chunk but the first and last few is such a chunk.
    fn same_but_content<'p>(&self, payload: &'p [u8]) -> Option<&'p str> {
        let (start, end) = self.last_content?;
        let last = &self.last_chunk;
        let tail = last.len() - end;
        let content_end = payload.len().checked_sub(tail)?;
        if content_end < start
            || payload[..start] != last[..start]
            || payload[content_end..] != last[end..]
        {
            return None;
        }
        let content = &payload[start..content_end];
        if crate::json_walk::plain_run(content) != content.len() {
            return None;
        }
        std::str::from_utf8(content).ok()
    }

    /// Remembers `chunk` (read from `payload` by the hand-written reader) for
    /// [`SseScan::same_but_content`] if its only text is one choice's unescaped `delta.content`.
    fn remember(&mut self, payload: &[u8], chunk: &StreamEvent) {
        let content = match &chunk.choices {
            Some(Choices {
                first:
                    Some(StreamChoice {
                        delta:
                            Some(Delta {
                                content: Text(Some(Cow::Borrowed(content))),
                                refusal: Text(None),
                                tool_calls: None,
                                function_call: None,
                            }),
                        text: Text(None),
                    }),
                rest,
            }) if rest.is_empty()
                && chunk.kind.0.is_none()
                && chunk.usage.is_none()
                && chunk.error.0.is_none()
                && chunk.code.0.is_none()
                && chunk.response.is_none()
                && payload.len() <= MAX_LAST_CHUNK =>
            {
                content
            }
            _ => return,
        };
        let start = content.as_ptr() as usize - payload.as_ptr() as usize;
        self.last_chunk.clear();
        self.last_chunk.extend_from_slice(payload);
        self.last_content = Some((start, start + content.len()));
    }

    /// A Responses event of type `kind`: nested usage, and counted deltas.
    fn responses_event(
        &mut self,
        kind: &str,
        delta: Option<&str>,
        response: Option<ResponseObject>,
    ) {
        if !kind.starts_with("response.") {
            return;
        }
        self.chunks += 1;
        if let Some(u) = response
            .and_then(|r| r.usage)
            .and_then(RawUsage::into_usage)
        {
            self.usage = Some(u);
        }
        if let Some(text) = delta
            && let Some((_, kind)) = COUNTED_DELTAS.iter().find(|(k, _)| *k == kind)
        {
            self.add(*kind, text);
        }
    }

    /// Records the event's failure, if it reports one and none was recorded before.
    fn note_failure(&mut self, ev: &StreamEvent) {
        if self.failure.is_some() {
            return;
        }
        let response = ev.response.as_ref();
        let (kind, code) = match ev.kind.as_str() {
            Some("response.failed") => (
                StreamFailureKind::Failed,
                response.and_then(|r| r.error.code()),
            ),
            Some("response.incomplete") => (
                StreamFailureKind::Incomplete,
                response.and_then(|r| r.incomplete_details.reason()),
            ),
            Some("error") => (
                StreamFailureKind::Error,
                ev.code.as_str().or_else(|| ev.error.code()),
            ),
            _ if ev.error.0.is_some() => (StreamFailureKind::Error, ev.error.code()),
            _ => return,
        };
        self.failure = Some(StreamFailure {
            kind,
            code: code.map(short_code),
        });
    }

    /// Records the object id: a Responses event's `response.id` (final), else a chat chunk's id.
    fn note_id(&mut self, ev: &StreamEvent) {
        if self.id_is_final {
            return;
        }
        if let Some(id) = ev.response.as_ref().and_then(|r| r.id.as_str())
            && usable_id(id)
        {
            self.id = Some(id.to_owned());
            self.id_is_final = true;
        } else if self.id.is_none()
            && ev.kind.as_str().is_none()
            && let Some(id) = ev.id.as_str()
            && usable_id(id)
        {
            self.id = Some(id.to_owned());
        }
    }

    fn add(&mut self, kind: TextKind, text: &str) {
        if !self.pending.is_empty()
            && (kind != self.pending_kind || self.pending.len() + text.len() > COUNT_BATCH)
        {
            self.count_pending();
        }
        self.pending_kind = kind;
        self.pending.push_str(text);
    }

    fn count_pending(&mut self) {
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(count(self.encoding, &self.pending));
        self.pending.clear();
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
        if !self.pending.is_empty() {
            self.count_pending();
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
    fn json_malformed_bodies_give_nothing() {
        for body in [
            // Not starting with an object (an SSE body read as JSON, stray bytes).
            &br#"data: {"usage":{"prompt_tokens":1},"id":"a"}"#[..],
            br#"x{"usage":{"prompt_tokens":1},"id":"a"}"#,
            br#"]{"usage":{"prompt_tokens":1},"id":"a"}"#,
            // A colon where none belongs: no member starts there.
            br#"{"usage":"a":{"prompt_tokens":1}}"#,
            br#"{"a":"usage":{"prompt_tokens":1}}"#,
            br#"{"usage":1:{"prompt_tokens":1}}"#,
            br#"{"x":"id":"a"}"#,
        ] {
            assert_eq!(
                report_all_ways(false, body, 0),
                (None, None, None),
                "{body:?}"
            );
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
    fn large_usage_and_events_are_read() {
        // A usage object with many details, well under its 64 KiB cap.
        let details: Vec<String> = (0..500).map(|i| format!("\"detail_{i}\":{i}")).collect();
        let body = format!(
            r#"{{"usage":{{"prompt_tokens":1,"completion_tokens":2,{}}}}}"#,
            details.join(",")
        );
        assert!(body.len() > 8 * 1024);
        assert_eq!(
            scan_chunks(false, &[body.as_bytes()], 0),
            Some((usage(1, 2, 3), UsageSource::Reported))
        );
        // A `response.completed` carrying a long output, well under the 1 MiB event cap.
        let text = "All work and no play makes Jack a dull boy. ".repeat(2000);
        let body = format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"resp_big\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{text}\"}}]}}],\"usage\":{{\"input_tokens\":5,\"output_tokens\":20000,\"total_tokens\":20005}}}}}}\n\n"
        );
        assert!(body.len() > 64 * 1024);
        assert_eq!(
            report_chunks(true, &[body.as_bytes()], 0),
            (
                Some((usage(5, 20000, 20005), UsageSource::Reported)),
                Some("resp_big".to_owned()),
                None
            )
        );
        assert_eq!((MAX_USAGE_BYTES, MAX_EVENT_BYTES), (64 << 10, 1 << 20));
    }

    #[test]
    fn json_oversized_usage_is_dropped() {
        let mut body = br#"{"usage":{"prompt_tokens":1,"pad":""#.to_vec();
        body.extend(std::iter::repeat_n(b'x', MAX_USAGE_BYTES));
        body.extend_from_slice(br#""}}"#);
        assert_eq!(scan_chunks(false, &[&body], 0), None);
        // Raw text over the cap before a small value: dropped too, wherever
        // the body is cut (the part after a cut is never read on its own).
        let mut body = br#"{"usage":"#.to_vec();
        body.extend(std::iter::repeat_n(b' ', MAX_USAGE_BYTES + 1));
        let value = br#"{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
        let start = body.len();
        body.extend_from_slice(value);
        for at in [0, 9, start - 1, start, start + 1, body.len()] {
            assert_eq!(
                scan_chunks(false, &[&body[..at], &body[at..]], 0),
                None,
                "cut at {at}"
            );
        }
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

    /// What a stream's scan has gathered so far.
    fn sse_state(s: &SseScan) -> impl PartialEq + fmt::Debug {
        (
            s.usage,
            s.chunks,
            s.completion_tokens,
            s.pending.clone(),
            s.pending_kind,
            s.failure.clone(),
            s.id.clone(),
            s.id_is_final,
        )
    }

    /// A chunk that repeats the last one but for its content is read without parsing it, and
    /// exactly as reading it would: over long random streams of chunks, each a fresh one, the
    /// last one with new content (plain, escaped, with quotes, control characters, bytes that are
    /// not UTF-8) or the last one with a random byte edited, a scanner that remembers chunks
    /// gathers the same as one that forgets them before every event.
    #[test]
    fn chunks_that_differ_only_in_content_read_as_in_full() {
        use rand::prelude::*;
        const FRESH: [&str; 9] = [
            r#"{"choices":[{"delta":{"content":"u"}}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
            r#"{"choices":[{"content_filter_results":{},"delta":{"content":"","refusal":null,"role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],"created":1,"id":"chatcmpl-1","model":"gpt-4o","object":"chat.completion.chunk","system_fingerprint":"fp","usage":null}"#,
            r#"{"choices":[{"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}},"delta":{"content":"Hello"},"finish_reason":null,"index":0,"logprobs":null}],"created":1,"id":"chatcmpl-2","model":"gpt-4o","object":"chat.completion.chunk"}"#,
            r#"{"choices":[{"delta":{"content":"a"},"index":0}],"id":""}"#,
            r#"{"choices":[{"delta":{"content":"x","refusal":"no"},"index":0}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":{"name":"f","arguments":"{}"}}]},"index":0}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
            r#"{"choices":[{"text":"legacy","index":0}]}"#,
            r#"{"type":"response.output_text.delta","delta":"resp"}"#,
        ];
        const CONTENT: [&[u8]; 12] = [
            b"",
            b" world",
            b"\xc3\xa9",
            b"\\n",
            b"\\\\",
            b"\\\"",
            b"\\u00e9",
            b"\xff",
            b"\"",
            b"\x01",
            br#"}]},{"delta":{"content":"x"#,
            br#""},"refusal":"r"#,
        ];
        let mut rng = StdRng::seed_from_u64(7);
        let mut shortcuts = 0;
        for _ in 0..200 {
            let mut remembering = SseScan::new(ENC, 5);
            let mut forgetting = SseScan::new(ENC, 5);
            let mut last = FRESH[0].as_bytes().to_vec();
            for _ in 0..60 {
                let event = match rng.random_range(0..5) {
                    0 => FRESH[rng.random_range(0..FRESH.len())].as_bytes().to_vec(),
                    1 | 2 => {
                        // New content where the last chunk had its content (or anywhere).
                        let at = memchr::memmem::find(&last, b"\"content\":\"")
                            .map_or(rng.random_range(0..=last.len()), |at| at + 11);
                        let end = at + last[at..].iter().position(|&b| b == b'"').unwrap_or(0);
                        let mut e = last[..at].to_vec();
                        // Half the time plain text only (the first three).
                        let pieces = if rng.random_bool(0.5) {
                            3
                        } else {
                            CONTENT.len()
                        };
                        for _ in 0..rng.random_range(0..3) {
                            e.extend_from_slice(CONTENT[rng.random_range(0..pieces)]);
                        }
                        e.extend_from_slice(&last[end..]);
                        e
                    }
                    _ => {
                        let mut e = last.clone();
                        let at = rng.random_range(0..e.len().max(1));
                        let byte = b"\"{}[],:\\ 0ax\x01\xff"[rng.random_range(0..14)];
                        match rng.random_range(0..3) {
                            0 if at < e.len() => e[at] = byte,
                            1 if at < e.len() => {
                                e.remove(at);
                            }
                            _ => e.insert(at.min(e.len()), byte),
                        }
                        e
                    }
                };
                if remembering.same_but_content(event.trim_ascii()).is_some() {
                    shortcuts += 1;
                }
                let mut framed = b"data: ".to_vec();
                framed.extend_from_slice(&event);
                framed.extend_from_slice(b"\n\n");
                remembering.feed(&framed);
                forgetting.last_content = None;
                forgetting.feed(&framed);
                assert_eq!(
                    sse_state(&remembering),
                    sse_state(&forgetting),
                    "{}",
                    String::from_utf8_lossy(&event)
                );
                last = event;
            }
            assert_eq!(remembering.finish(), forgetting.finish());
        }
        assert!(shortcuts > 500, "{shortcuts}");
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
    fn sse_multi_line_data_with_crlf() {
        let body = "data: {\"choices\":[{\"index\":0,\r\ndata: \"delta\":{\"content\":\"hello world\"}}]}\r\n\r\n";
        assert_eq!(
            scan_all_ways(true, body.as_bytes(), 0),
            Some((usage(0, 2, 2), UsageSource::Counted))
        );
    }

    #[test]
    fn sse_text_is_counted_in_batches() {
        let c = |s: &str| u64::from(count_text(ENC, s));
        // 300 deltas of 10 bytes: batches of 2040 bytes (204 deltas), then 960.
        let delta = " abcdefghi";
        let mut body = String::new();
        for _ in 0..300 {
            body.push_str(&format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{delta}\"}}}}]}}\n\n"
            ));
        }
        let expected = c(&delta.repeat(204)) + c(&delta.repeat(96));
        assert_eq!(
            scan_chunks(true, &[body.as_bytes()], 0),
            Some((usage(0, expected, expected), UsageSource::Counted))
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
        // Each kind of text is counted as a whole: the arguments' deltas together.
        let expected = c("get_weather") + c("{\"city\":\"Oslo\"}") + c("No.");
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

    /// A chat chunk with `hello world` as content, padded to exactly `len` bytes of JSON.
    fn padded_chunk(len: usize) -> String {
        let head = r#"{"choices":[{"index":0,"delta":{"content":"hello world"}}],"pad":""#;
        let mut s = head.to_owned();
        s.push_str(&"p".repeat(len - head.len() - 2));
        s.push_str("\"}");
        assert_eq!(s.len(), len);
        s
    }

    #[test]
    fn sse_line_and_data_caps_are_exact() {
        let read = Some((usage(0, 2, 2), UsageSource::Counted));
        // One line of exactly the cap is read, one byte more is not; the line arrives in pieces.
        for (extra, expected) in [(0, read), (1, None)] {
            let line = format!("data:{}", padded_chunk(MAX_EVENT_BYTES - 5 + extra));
            assert_eq!(line.len(), MAX_EVENT_BYTES + extra);
            let body = format!("{line}\n\n");
            let (a, b) = body.as_bytes().split_at(line.len() / 2);
            assert_eq!(scan_chunks(true, &[a, b], 0), expected, "+{extra}");
            let pieces: Vec<&[u8]> = body.as_bytes().chunks(100_000).collect();
            assert_eq!(scan_chunks(true, &pieces, 0), expected, "+{extra}");
        }
        // Data of exactly the cap (two lines joined by a newline) is read, one byte more is not.
        for (extra, expected) in [(0, read), (1, None)] {
            let json = padded_chunk(MAX_EVENT_BYTES - 1 + extra);
            let (first, second) = json.split_at(json.find("\"pad\"").unwrap());
            let body = format!("data: {first}\ndata: {second}\n\n");
            assert_eq!(
                scan_chunks(true, &[body.as_bytes()], 0),
                expected,
                "+{extra}"
            );
        }
    }

    #[test]
    fn sse_event_with_an_oversized_line_is_dropped_whole() {
        let small = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hello world\"}}]}\n";
        let huge = format!("data: {}", "z".repeat(MAX_EVENT_BYTES));
        // The event's first data line is not read on its own.
        let body = format!("{small}{huge}\n\n");
        assert_eq!(scan_chunks(true, &[body.as_bytes()], 0), None);
        // Same when the body ends inside the oversized line.
        let body = format!("{small}{huge}");
        assert_eq!(scan_chunks(true, &[body.as_bytes()], 0), None);
        let pieces: Vec<&[u8]> = body.as_bytes().chunks(65_536).collect();
        assert_eq!(scan_chunks(true, &pieces, 0), None);
        // A last line without any line ending is read at the end.
        let body = small.trim_end();
        assert_eq!(
            scan_all_ways(true, body.as_bytes(), 0),
            Some((usage(0, 2, 2), UsageSource::Counted))
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

    /// Everything a scanner tells after a body: usage, object id, failure.
    type Report = (
        Option<(Usage, UsageSource)>,
        Option<String>,
        Option<StreamFailure>,
    );

    fn report_chunks(sse: bool, chunks: &[&[u8]], prompt: u32) -> Report {
        let mut s = UsageScanner::new(sse, ENC, prompt);
        for c in chunks {
            s.feed(c);
        }
        let usage = s.finish();
        assert_eq!(s.finish(), usage, "finish is repeatable");
        (
            usage,
            s.object_id().map(str::to_owned),
            s.failure().cloned(),
        )
    }

    /// [`report_chunks`] for `body` whole, split in two at every byte, and byte by byte, which
    /// must all agree.
    fn report_all_ways(sse: bool, body: &[u8], prompt: u32) -> Report {
        let whole = report_chunks(sse, &[body], prompt);
        for at in 0..=body.len() {
            let (a, b) = body.split_at(at);
            assert_eq!(report_chunks(sse, &[a, b], prompt), whole, "split at {at}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(report_chunks(sse, &bytes, prompt), whole, "byte by byte");
        whole
    }

    fn failure(kind: StreamFailureKind, code: Option<&str>) -> Option<StreamFailure> {
        Some(StreamFailure {
            kind,
            code: code.map(str::to_owned),
        })
    }

    const RESP_ID: &str = "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b";

    /// A Responses API non-streamed body, as Azure returns it.
    const RESPONSES_BODY: &str = r#"{
  "id": "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
  "object": "response",
  "created_at": 1741476542,
  "status": "completed",
  "error": null,
  "incomplete_details": null,
  "instructions": "Answer with \"id\": and \"usage\": words {braces}",
  "max_output_tokens": null,
  "model": "gpt-4.1-2025-04-14",
  "output": [
    {
      "type": "message",
      "id": "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b",
      "status": "completed",
      "role": "assistant",
      "content": [
        {"type": "output_text", "text": "In a peaceful grove beneath a silver moon, a unicorn named Lumina discovered a hidden pool.", "annotations": []}
      ]
    }
  ],
  "parallel_tool_calls": true,
  "previous_response_id": null,
  "reasoning": {"effort": null, "summary": null},
  "store": true,
  "temperature": 1.0,
  "text": {"format": {"type": "text"}},
  "tool_choice": "auto",
  "tools": [],
  "top_p": 1.0,
  "truncation": "disabled",
  "usage": {
    "input_tokens": 36,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 87,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 123
  },
  "user": null,
  "metadata": {}
}"#;

    #[test]
    fn json_responses_body_usage_and_id() {
        assert_eq!(
            report_all_ways(false, RESPONSES_BODY.as_bytes(), 5),
            (
                Some((usage(36, 87, 123), UsageSource::Reported)),
                Some(RESP_ID.to_owned()),
                None
            )
        );
        // A chat body's id too, when it comes after a nested or quoted "id".
        assert_eq!(
            report_chunks(false, &[CHAT_BODY.as_bytes()], 0)
                .1
                .as_deref(),
            Some("chatcmpl-A1")
        );
    }

    #[test]
    fn json_usage_only_reads_no_id() {
        let body = br#"{"id":"chatcmpl-1","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        for at in 0..=body.len() {
            let mut s = UsageScanner::usage_only(false, Encoding::O200kBase, 0);
            s.feed(&body[..at]);
            s.feed(&body[at..]);
            assert_eq!(s.object_id(), None, "split at {at}");
            assert_eq!(
                s.finish(),
                Some((usage(3, 4, 7), UsageSource::Reported)),
                "split at {at}"
            );
        }
        // A stream is read as before, its id included.
        let event = b"data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\"}}\n\n";
        let mut only = UsageScanner::usage_only(true, Encoding::O200kBase, 0);
        let mut all = UsageScanner::new(true, Encoding::O200kBase, 0);
        only.feed(event);
        all.feed(event);
        assert_eq!(only.object_id(), Some("resp_1"));
        assert_eq!(only.object_id(), all.object_id());
    }

    #[test]
    fn json_object_ids() {
        let id = |body: &[u8]| report_all_ways(false, body, 0).1;
        assert_eq!(id(br#"{"id":"a"}"#).as_deref(), Some("a"));
        assert_eq!(
            id(b" {\n \"id\" :\t\"x-1\" ,\"id\":\"second\"}").as_deref(),
            Some("x-1")
        );
        assert_eq!(
            id(br#"{"data":{"id":"nested"},"i":"id","idx":"no","Id":"no","i\u0064":"no","id":"yes"}"#)
                .as_deref(),
            Some("yes")
        );
        // Escapes in the id are decoded.
        assert_eq!(id(br#"{"id":"a\"b\u0041"}"#).as_deref(), Some("a\"bA"));
        // Not a string, empty, or too long: ignored (a later usable one is taken).
        for body in [
            &br#"{"id":5}"#[..],
            br#"{"id":null}"#,
            br#"{"id":{"id":"x"}}"#,
            br#"{"id":["x"]}"#,
            br#"{"id":""}"#,
            br#"["id","x"]"#,
            br#"{"object":"x"}"#,
            b"",
        ] {
            assert_eq!(id(body), None, "{body:?}");
        }
        let longest = "i".repeat(MAX_ID_BYTES);
        let body = format!(r#"{{"id":"{longest}"}}"#);
        assert_eq!(id(body.as_bytes()), Some(longest.clone()));
        let body = format!(r#"{{"id":"{longest}x","id":"short"}}"#);
        assert_eq!(id(body.as_bytes()).as_deref(), Some("short"));
        // Raw text over the capture cap (whitespace here) is dropped without parsing.
        let spaced = format!(
            r#"{{"id":{}"a","usage":{{"prompt_tokens":1}}}}"#,
            " ".repeat(MAX_ID_CAPTURE)
        );
        assert_eq!(
            report_chunks(false, &[spaced.as_bytes()], 0),
            (Some((usage(1, 0, 1), UsageSource::Reported)), None, None)
        );
        let spaced = format!(r#"{{"id":{}"a"}}"#, " ".repeat(MAX_ID_CAPTURE - 3));
        assert_eq!(id(spaced.as_bytes()).as_deref(), Some("a"));
        let spaced = format!(r#"{{"id":{}"b"}}"#, " ".repeat(400));
        assert_eq!(id(spaced.as_bytes()).as_deref(), Some("b"));
        // Truncated right after the id's value.
        assert_eq!(id(br#"{"id":"trunc""#).as_deref(), Some("trunc"));
        // A JSON body never reports a stream failure.
        assert_eq!(
            report_chunks(false, &[br#"{"error":{"code":"x"},"type":"error"}"#], 0).2,
            None
        );
    }

    fn resp_object(status: &str, extra: &str, usage: &str) -> String {
        format!(
            r#"{{"id":"{RESP_ID}","object":"response","created_at":1741476542,"status":"{status}","error":null,"incomplete_details":null,"instructions":null,"model":"gpt-4o-mini","output":[],"text":{{"format":{{"type":"text"}}}},"tools":[],"usage":{usage}{extra}}}"#
        )
    }

    fn resp_event(kind: &str, seq: u32, body: &str) -> String {
        format!("event: {kind}\ndata: {{\"type\":\"{kind}\",\"sequence_number\":{seq}{body}}}\n\n")
    }

    const RESP_WORDS: [&str; 3] = ["Hello", " from", " Responses!"];

    /// An Azure-shaped Responses stream; `end` is the final event (`None`: the stream is cut
    /// before it).
    fn responses_stream(end: Option<(&str, &str, &str)>) -> String {
        let msg = "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b";
        let mut s = resp_event(
            "response.created",
            0,
            &format!(r#","response":{}"#, resp_object("in_progress", "", "null")),
        );
        s += &resp_event(
            "response.in_progress",
            1,
            &format!(r#","response":{}"#, resp_object("in_progress", "", "null")),
        );
        s += &resp_event(
            "response.output_item.added",
            2,
            &format!(
                r#","output_index":0,"item":{{"id":"{msg}","type":"message","status":"in_progress","content":[],"role":"assistant"}}"#
            ),
        );
        s += &resp_event(
            "response.content_part.added",
            3,
            &format!(
                r#","item_id":"{msg}","output_index":0,"content_index":0,"part":{{"type":"output_text","annotations":[],"text":""}}"#
            ),
        );
        for (i, w) in RESP_WORDS.iter().enumerate() {
            s += &resp_event(
                "response.output_text.delta",
                4 + i as u32,
                &format!(
                    r#","item_id":"{msg}","output_index":0,"content_index":0,"delta":{}"#,
                    serde_json::json!(w)
                ),
            );
        }
        let text = RESP_WORDS.concat();
        s += &resp_event(
            "response.output_text.done",
            7,
            &format!(r#","item_id":"{msg}","output_index":0,"content_index":0,"text":"{text}""#),
        );
        if let Some((kind, status, extra)) = end {
            s += &resp_event(
                kind,
                8,
                &format!(
                    r#","response":{}"#,
                    resp_object(
                        status,
                        extra,
                        r#"{"input_tokens":21,"input_tokens_details":{"cached_tokens":0},"output_tokens":5,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":26}"#
                    )
                ),
            );
        }
        s
    }

    #[test]
    fn sse_responses_completed_at_every_split() {
        let body = responses_stream(Some(("response.completed", "completed", "")));
        assert_eq!(
            report_all_ways(true, body.as_bytes(), 100),
            (
                Some((usage(21, 5, 26), UsageSource::Reported)),
                Some(RESP_ID.to_owned()),
                None
            )
        );
        // CRLF line endings.
        let crlf = body.replace('\n', "\r\n");
        assert_eq!(
            report_chunks(true, &[crlf.as_bytes()], 100),
            report_chunks(true, &[body.as_bytes()], 100)
        );
    }

    #[test]
    fn sse_responses_without_completed_is_counted() {
        let body = responses_stream(None);
        let counted: u64 = RESP_WORDS
            .iter()
            .map(|w| u64::from(count_text(ENC, w)))
            .sum();
        assert_eq!(
            report_all_ways(true, body.as_bytes(), 40),
            (
                Some((usage(40, counted, 40 + counted), UsageSource::Counted)),
                Some(RESP_ID.to_owned()),
                None
            )
        );
        // Refusal and function-argument deltas count; other deltas and `done` texts do not.
        let c = |s: &str| u64::from(count_text(ENC, s));
        let body = concat!(
            "data: {\"type\":\"response.refusal.delta\",\"delta\":\"I can't\"}\n\n",
            "data: {\"type\":\"response.function_call_arguments.delta\",\"delta\":\"{\\\"city\\\":\"}\n\n",
            "data: {\"type\":\"response.function_call_arguments.done\",\"arguments\":\"{\\\"city\\\":1}\"}\n\n",
            "data: {\"type\":\"response.reasoning_summary_text.delta\",\"delta\":\"thinking hard\"}\n\n",
            "data: {\"type\":\"response.audio.delta\",\"delta\":\"UklGRg==\"}\n\n",
            "data: {\"type\":\"response.output_text.delta\",\"delta\":{\"odd\":true}}\n\n",
            "data: {\"type\":\"response.output_text.done\",\"text\":\"I can't\"}\n\n",
            "data: {\"type\":\"other.delta\",\"delta\":\"nope\"}\n\n",
            "data: {\"type\":7,\"delta\":\"nope\"}\n\n",
        );
        let expected = c("I can't") + c("{\"city\":");
        assert_eq!(
            report_chunks(true, &[body.as_bytes()], 2),
            (
                Some((usage(2, expected, 2 + expected), UsageSource::Counted)),
                None,
                None
            )
        );
        // Events that are not `response.*` do not make a stream countable.
        let body = "data: {\"type\":\"other.delta\",\"delta\":\"nope\"}\n\n";
        assert_eq!(report_chunks(true, &[body.as_bytes()], 2).0, None);
    }

    #[test]
    fn sse_responses_usage_in_failed_and_incomplete() {
        let body = responses_stream(Some((
            "response.incomplete",
            "incomplete",
            r#","incomplete_details_x":1,"incomplete_details":{"reason":"max_output_tokens"}"#,
        )))
        .replace(r#""incomplete_details":null,"#, "");
        assert_eq!(
            report_all_ways(true, body.as_bytes(), 0),
            (
                Some((usage(21, 5, 26), UsageSource::Reported)),
                Some(RESP_ID.to_owned()),
                failure(StreamFailureKind::Incomplete, Some("max_output_tokens"))
            )
        );
        let body = responses_stream(Some((
            "response.failed",
            "failed",
            r#","error_":1"#,
        )))
        .replace(
            r#""status":"failed","error":null"#,
            r#""status":"failed","error":{"code":"server_error","message":"The model failed on your text: secret"}"#,
        );
        let (u, id, f) = report_chunks(true, &[body.as_bytes()], 0);
        assert_eq!(u, Some((usage(21, 5, 26), UsageSource::Reported)));
        assert_eq!(id.as_deref(), Some(RESP_ID));
        assert_eq!(f, failure(StreamFailureKind::Failed, Some("server_error")));
        assert!(!format!("{f:?}").contains("secret"));
    }

    #[test]
    fn sse_failures() {
        let f = |body: &str| report_all_ways(true, body.as_bytes(), 1).2;
        use StreamFailureKind::*;
        // Chat: a top-level error object.
        assert_eq!(
            f(
                "data: {\"error\":{\"code\":\"content_filter\",\"message\":\"m\",\"param\":null,\"status\":400}}\n\n"
            ),
            failure(Error, Some("content_filter"))
        );
        assert_eq!(
            f(
                "data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\",\"code\":null}}\n\n"
            ),
            failure(Error, None)
        );
        assert_eq!(
            f("data: {\"error\":{\"code\":500}}\n\n"),
            failure(Error, Some("500"))
        );
        // Not an object: not a failure.
        assert_eq!(f("data: {\"error\":null,\"choices\":[]}\n\n"), None);
        assert_eq!(f("data: {\"error\":\"x\",\"choices\":[]}\n\n"), None);
        // Responses `error` event: top-level code, else a nested one.
        assert_eq!(
            f(
                "event: error\ndata: {\"type\":\"error\",\"code\":\"ERR_SOMETHING\",\"message\":\"Something went wrong\",\"param\":null,\"sequence_number\":1}\n\n"
            ),
            failure(Error, Some("ERR_SOMETHING"))
        );
        assert_eq!(
            f(
                "data: {\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\",\"code\":\"bad\"}}\n\n"
            ),
            failure(Error, Some("bad"))
        );
        assert_eq!(
            f("data: {\"type\":\"error\",\"code\":\"top\",\"error\":{\"code\":\"nested\"}}\n\n"),
            failure(Error, Some("top"))
        );
        assert_eq!(f("data: {\"type\":\"error\"}\n\n"), failure(Error, None));
        // response.failed / response.incomplete without details.
        assert_eq!(
            f("data: {\"type\":\"response.failed\",\"response\":{\"error\":null}}\n\n"),
            failure(Failed, None)
        );
        assert_eq!(
            f("data: {\"type\":\"response.failed\"}\n\n"),
            failure(Failed, None)
        );
        assert_eq!(
            f(
                "data: {\"type\":\"response.incomplete\",\"response\":{\"incomplete_details\":{\"reason\":\"content_filter\"},\"error\":{\"code\":\"no\"}}}\n\n"
            ),
            failure(Incomplete, Some("content_filter"))
        );
        assert_eq!(
            f(
                "data: {\"type\":\"response.failed\",\"response\":{\"incomplete_details\":{\"reason\":\"no\"},\"error\":{\"code\":\"yes\"}}}\n\n"
            ),
            failure(Failed, Some("yes"))
        );
        // First failure wins.
        assert_eq!(
            f(
                "data: {\"type\":\"response.incomplete\",\"response\":{\"incomplete_details\":{\"reason\":\"first\"}}}\n\ndata: {\"type\":\"error\",\"code\":\"second\"}\n\n"
            ),
            failure(Incomplete, Some("first"))
        );
        // Ordinary events are no failure.
        assert_eq!(f(&chat_stream(true, "\n")), None);
        assert_eq!(
            f(&responses_stream(Some((
                "response.completed",
                "completed",
                ""
            )))),
            None
        );
    }

    #[test]
    fn failure_codes_are_cut_at_64_bytes() {
        let code = format!("{}é{}", "a".repeat(63), "b".repeat(100));
        let body = format!("data: {{\"type\":\"error\",\"code\":\"{code}\"}}\n\n");
        let got = report_chunks(true, &[body.as_bytes()], 0).2.unwrap();
        assert_eq!(got.code.as_deref(), Some(&*"a".repeat(63)));
        let code = "c".repeat(70);
        let body = format!("data: {{\"type\":\"error\",\"code\":\"{code}\"}}\n\n");
        let got = report_chunks(true, &[body.as_bytes()], 0).2.unwrap();
        assert_eq!(got.code.as_deref(), Some(&*"c".repeat(64)));
        assert_eq!(short_code("short"), "short");
        assert_eq!(short_code(&"d".repeat(64)), "d".repeat(64));
    }

    #[test]
    fn failure_and_id_are_known_as_events_complete() {
        let mut s = UsageScanner::new(true, ENC, 0);
        let body = responses_stream(Some(("response.incomplete", "incomplete", "")));
        let first_end = body.find("\n\n").unwrap();
        s.feed(&body.as_bytes()[..first_end + 1]);
        assert_eq!(s.object_id(), None);
        s.feed(&body.as_bytes()[first_end + 1..first_end + 2]);
        assert_eq!(s.object_id(), Some(RESP_ID));
        assert_eq!(s.failure(), None);
        s.feed(&body.as_bytes()[first_end + 2..]);
        assert_eq!(
            s.failure(),
            failure(StreamFailureKind::Incomplete, None).as_ref()
        );
        // JSON bodies: the id is known once its member has ended.
        let mut j = UsageScanner::new(false, ENC, 0);
        j.feed(br#"{"id":"abc""#);
        assert_eq!(j.object_id(), None);
        j.feed(b",");
        assert_eq!(j.object_id(), Some("abc"));
        assert_eq!(j.failure(), None);
    }

    #[test]
    fn sse_object_ids() {
        let id = |body: &str| report_all_ways(true, body.as_bytes(), 0).1;
        // Chat: Azure's first chunk has an empty id; the next chunk's id is taken.
        assert_eq!(
            id(&chat_stream(false, "\r\n")).as_deref(),
            Some("chatcmpl-A1")
        );
        assert_eq!(
            id("data: {\"id\":\"cmpl-1\",\"choices\":[]}\n\ndata: {\"id\":\"cmpl-2\",\"choices\":[]}\n\n")
                .as_deref(),
            Some("cmpl-1")
        );
        // A Responses id wins over a chat one; the first Responses id is kept.
        assert_eq!(
            id("data: {\"id\":\"chat\"}\n\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\"}}\n\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_2\"}}\n\ndata: {\"id\":\"chat2\"}\n\n")
                .as_deref(),
            Some("resp_1")
        );
        // Responses events' own top-level ids (not `response.id`) are not object ids.
        assert_eq!(
            id(
                "data: {\"type\":\"response.output_item.added\",\"id\":\"item\",\"item\":{\"id\":\"msg_1\"}}\n\n"
            ),
            None
        );
        // Empty, non-string and oversized ids are skipped.
        let long = "r".repeat(MAX_ID_BYTES + 1);
        let body = format!(
            "data: {{\"type\":\"response.created\",\"response\":{{\"id\":\"{long}\"}}}}\n\ndata: {{\"type\":\"response.in_progress\",\"response\":{{\"id\":7}}}}\n\ndata: {{\"type\":\"response.in_progress\",\"response\":{{\"id\":\"\"}}}}\n\ndata: {{\"id\":\"{long}\"}}\n\ndata: {{\"id\":\"c\"}}\n\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"ok\"}}}}\n\n"
        );
        assert_eq!(id(&body).as_deref(), Some("ok"));
        let exact = "r".repeat(MAX_ID_BYTES);
        let body = format!("data: {{\"id\":\"{exact}\"}}\n\n");
        assert_eq!(id(&body), Some(exact));
        let body = format!("data: {{\"id\":\"{long}\"}}\n\ndata: {{\"id\":\"c\"}}\n\n");
        assert_eq!(id(&body).as_deref(), Some("c"));
    }
}
