//! A hand-written reader for the events a stream carries by the hundred: chat and completions
//! chunks, and Responses delta events.
//!
//! serde's typed parse of such an event cost about 2 µs, most of it walking members nobody
//! reads (`content_filter_results`, `logprobs`, `system_fingerprint`). This reader walks the
//! event once, checks it at least as strictly as serde_json does, and builds the same
//! [`StreamEvent`]. It answers only when it is sure of serde's answer; it gives up (`None`) on
//! anything it does not handle itself:
//!
//! - malformed JSON of any kind, or nesting deeper than [`MAX_DEPTH`];
//! - a key with an escape or a byte outside ASCII;
//! - a member the typed parse would refuse as given twice;
//! - a `\u` escape in a string that is kept (one that is skipped may have one);
//! - a number where text is read (serde refuses one out of `f64`'s range);
//! - a token count in `usage` that is not an integer fitting in a `u64`, or a count given under
//!   both of its names (`prompt_tokens` and `input_tokens`);
//! - a top-level `error` or `code` other than `null` (error events, rare);
//! - a `response`, `error` or `incomplete_details` that is neither an object nor `null`;
//! - a choice, `delta`, tool call or function given as anything but an object or `null`.
//!
//! The caller then parses the event with serde, as before, so what is read never differs.
//! Tests compare the two on generated and mutated events.

use std::borrow::Cow;

use super::{
    Choices, Delta, FunctionDelta, RawUsage, ResponseObject, StreamChoice, StreamEvent,
    ToolCallDelta,
};
use crate::lenient::{Code, Detail, DetailFields, Text};

/// The deepest nesting walked; deeper events go to serde (whose limit is 128).
const MAX_DEPTH: u32 = 64;

/// The event in `payload`, read as serde would read it, or `None` when the reader leaves it to
/// serde.
pub(super) fn read(payload: &[u8]) -> Option<StreamEvent<'_>> {
    let mut r = Reader {
        b: payload,
        i: 0,
        depth: 0,
    };
    let event = r.event()?;
    r.ws();
    (r.i == r.b.len()).then_some(event)
}

/// Bytes that end a run of plain string bytes: the quote, the backslash and control characters.
static STRING_STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

const ONES: u64 = u64::from_le_bytes([1; 8]);
const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);

/// The high bit of each byte of `x` that is below `n` (n <= 0x80); exact for the lowest such
/// byte, which is all that is read.
fn below(x: u64, n: u8) -> u64 {
    x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS
}

/// The high bit of each byte of the eight bytes `word` that is a quote or a backslash (or, with
/// `control`, a control character); exact for the first such byte.
fn stops(word: &[u8], control: bool) -> u64 {
    let x = u64::from_le_bytes(word.try_into().unwrap_or_default());
    let quotes = below(x ^ (ONES * u64::from(b'"')), 1) | below(x ^ (ONES * u64::from(b'\\')), 1);
    if control {
        quotes | below(x, 0x20)
    } else {
        quotes
    }
}

/// How many bytes at the start of `b` are plain string bytes (no quote, backslash or control
/// character): eight at a time, then one by one.
pub(super) fn plain_run(b: &[u8]) -> usize {
    let mut i = 0;
    while let Some(word) = b.get(i..i + 8) {
        let stops = stops(word, true);
        if stops != 0 {
            return i + (stops.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while b.get(i).is_some_and(|&c| !STRING_STOP[usize::from(c)]) {
        i += 1;
    }
    i
}

/// Where the first quote or backslash in `b` is: the first 16 bytes eight at a time (most strings
/// of a JSON answer end there), the rest with `memchr2`.
pub(super) fn quote_or_backslash(b: &[u8]) -> Option<usize> {
    for at in [0, 8] {
        let Some(word) = b.get(at..at + 8) else {
            return b[at..]
                .iter()
                .position(|&c| c == b'"' || c == b'\\')
                .map(|p| at + p);
        };
        let stops = stops(word, false);
        if stops != 0 {
            return Some(at + (stops.trailing_zeros() / 8) as usize);
        }
    }
    memchr::memchr2(b'"', b'\\', &b[16..]).map(|p| 16 + p)
}

/// Marks which members of an object were seen, so a repeated one is noticed.
#[derive(Default)]
struct Seen(u8);

impl Seen {
    /// `None` when member `bit` was seen before.
    fn first(&mut self, bit: u8) -> Option<()> {
        if self.0 & bit != 0 {
            return None;
        }
        self.0 |= bit;
        Some(())
    }
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
    depth: u32,
}

impl<'a> Reader<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    /// The next byte after whitespace, left in place.
    #[inline]
    fn peek(&mut self) -> Option<u8> {
        // Compact JSON has no whitespace between tokens.
        match self.b.get(self.i) {
            Some(&c) if c > b' ' => Some(c),
            _ => {
                self.ws();
                self.b.get(self.i).copied()
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    fn null(&mut self) -> Option<()> {
        self.ws();
        self.literal(b"null")
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then(|| self.i += 1)
    }

    /// An object or array at the cursor, opened by `open` and closed by `close`: `item` reads
    /// each member or element.
    fn sequence(
        &mut self,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        if self.peek()? != open {
            return None;
        }
        self.enter()?;
        let mut empty = self.peek()? == close;
        while !empty {
            item(self)?;
            match self.peek()? {
                b',' => self.i += 1,
                c if c == close => empty = true,
                _ => return None,
            }
        }
        self.i += 1;
        self.depth -= 1;
        Some(())
    }

    /// The object at the cursor: each member's key (plain ASCII, no escapes) goes to `member`,
    /// which reads the value.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.sequence(b'{', b'}', |r| {
            if r.peek()? != b'"' {
                return None;
            }
            let (key, escaped) = r.string()?;
            if escaped || !key.is_ascii() || r.peek()? != b':' {
                return None;
            }
            r.i += 1;
            member(r, key)
        })
    }

    /// The array at the cursor: `element` reads each element.
    fn array(&mut self, element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.sequence(b'[', b']', element)
    }

    /// The string at the cursor (its opening quote): its raw bytes between the quotes, and
    /// whether they hold escapes. Escapes are checked as serde_json checks them; the bytes are
    /// not checked for UTF-8 (serde_json does not check a string it skips either).
    fn string(&mut self) -> Option<(&'a [u8], bool)> {
        let start = self.i + 1;
        let mut i = start;
        let mut escaped = false;
        loop {
            i += plain_run(self.b.get(i..)?);
            let c = *self.b.get(i)?;
            match c {
                b'"' => {
                    self.i = i + 1;
                    return Some((&self.b[start..i], escaped));
                }
                b'\\' => {
                    escaped = true;
                    i += match *self.b.get(i + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => 2,
                        b'u' if self.b.get(i + 2..i + 6)?.iter().all(u8::is_ascii_hexdigit) => 6,
                        _ => return None,
                    };
                }
                _ => return None, // a control character
            }
        }
    }

    /// A number (skipped), with serde_json's grammar.
    fn number(&mut self) -> Option<()> {
        let digits = |i: &mut usize| {
            let from = *i;
            while let Some(b'0'..=b'9') = self.b.get(*i) {
                *i += 1;
            }
            *i > from
        };
        let mut i = self.i;
        if self.b.get(i) == Some(&b'-') {
            i += 1;
        }
        match self.b.get(i)? {
            b'0' => {
                i += 1;
                if let Some(b'0'..=b'9') = self.b.get(i) {
                    return None;
                }
            }
            b'1'..=b'9' => {
                digits(&mut i);
            }
            _ => return None,
        }
        if self.b.get(i) == Some(&b'.') {
            i += 1;
            if !digits(&mut i) {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.b.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = self.b.get(i) {
                i += 1;
            }
            if !digits(&mut i) {
                return None;
            }
        }
        self.i = i;
        Some(())
    }

    /// Any value, checked and skipped.
    fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(|r, _| r.skip()),
            b'[' => self.array(Self::skip),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// A member read as [`Text`]: a string, or any other value but a number (which reads as
    /// none).
    fn text<const NUMBERS: bool>(&mut self) -> Option<Text<'a, NUMBERS>> {
        match self.peek()? {
            b'"' => {
                let (raw, escaped) = self.string()?;
                let raw = std::str::from_utf8(raw).ok()?;
                Some(Text(Some(if escaped {
                    Cow::Owned(unescape(raw)?)
                } else {
                    Cow::Borrowed(raw)
                })))
            }
            b'-' | b'0'..=b'9' => None,
            _ => self.skip().map(|()| Text(None)),
        }
    }

    /// A member that is either `null` or what `read` reads (which refuses any other shape).
    fn nullable<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.peek()? == b'n' {
            self.literal(b"null").map(|()| None)
        } else {
            read(self).map(Some)
        }
    }

    fn event(&mut self) -> Option<StreamEvent<'a>> {
        let mut seen = Seen::default();
        let mut kind = Text(None);
        let mut choices = None;
        let mut id = Text(None);
        let mut delta = Text(None);
        let mut usage = None;
        let mut response = None;
        self.object(|r, key| {
            match key {
                b"type" => {
                    seen.first(1)?;
                    kind = r.text()?;
                }
                b"choices" => {
                    seen.first(2)?;
                    choices = r.nullable(Self::choices)?;
                }
                b"id" => {
                    seen.first(4)?;
                    id = r.text()?;
                }
                b"delta" => {
                    seen.first(8)?;
                    delta = r.text()?;
                }
                b"usage" => {
                    seen.first(16)?;
                    usage = r.nullable(Self::usage)?;
                }
                b"response" => {
                    seen.first(128)?;
                    response = r.nullable(Self::response)?;
                }
                b"error" | b"code" => {
                    seen.first(if key == b"error" { 32 } else { 64 })?;
                    r.null()?;
                }
                _ => r.skip()?,
            }
            Some(())
        })?;
        Some(StreamEvent {
            kind,
            choices,
            usage,
            id,
            error: Detail(None),
            code: Code::default(),
            delta,
            response,
        })
    }

    /// A Responses lifecycle event's `response`: its id, usage, `error` and
    /// `incomplete_details` (the output and everything else skipped).
    fn response(&mut self) -> Option<ResponseObject<'a>> {
        let mut seen = Seen::default();
        let mut response = ResponseObject {
            id: Text(None),
            usage: None,
            error: Detail(None),
            incomplete_details: Detail(None),
        };
        self.object(|r, key| {
            match key {
                b"id" => {
                    seen.first(1)?;
                    response.id = r.text()?;
                }
                b"usage" => {
                    seen.first(2)?;
                    response.usage = r.nullable(Self::usage)?;
                }
                b"error" => {
                    seen.first(4)?;
                    response.error = Detail(r.nullable(Self::detail)?);
                }
                b"incomplete_details" => {
                    seen.first(8)?;
                    response.incomplete_details = Detail(r.nullable(Self::detail)?);
                }
                _ => r.skip()?,
            }
            Some(())
        })?;
        Some(response)
    }

    /// An `error` or `incomplete_details` object: its `code` and `reason`. Read by a hand-written
    /// serde visitor, not a derived one: a repeated key keeps its last value.
    fn detail(&mut self) -> Option<DetailFields<'a>> {
        let mut fields = DetailFields::default();
        self.object(|r, key| {
            match key {
                b"code" => fields.code = r.text()?,
                b"reason" => fields.reason = r.text()?,
                _ => r.skip()?,
            }
            Some(())
        })?;
        Some(fields)
    }

    /// A `usage` object: its token counts, each `null` or an integer that fits in a `u64`
    /// (anything else is left to serde, which refuses a negative or fractional count).
    fn usage(&mut self) -> Option<RawUsage> {
        let mut seen = Seen::default();
        let mut usage = RawUsage {
            prompt_tokens: None,
            completion_tokens: None,
            total_tokens: None,
        };
        self.object(|r, key| {
            // The Responses API's names are aliases: given with the chat name, a repeat.
            let (bit, field) = match key {
                b"prompt_tokens" | b"input_tokens" => (1, &mut usage.prompt_tokens),
                b"completion_tokens" | b"output_tokens" => (2, &mut usage.completion_tokens),
                b"total_tokens" => (4, &mut usage.total_tokens),
                _ => return r.skip(),
            };
            seen.first(bit)?;
            *field = r.nullable(Self::count)?;
            Some(())
        })?;
        Some(usage)
    }

    /// An integer that fits in a `u64`, not followed by a fraction or an exponent.
    fn count(&mut self) -> Option<u64> {
        let mut i = self.i;
        let mut n: u64 = 0;
        while let Some(&d @ b'0'..=b'9') = self.b.get(i) {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            i += 1;
        }
        let digits = i - self.i;
        if digits == 0
            || (digits > 1 && self.b[self.i] == b'0')
            || matches!(self.b.get(i), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        self.i = i;
        Some(n)
    }

    fn choices(&mut self) -> Option<Choices<'a>> {
        let mut first = None;
        let mut rest = Vec::new();
        self.array(|r| {
            let choice = r.choice()?;
            if first.is_none() {
                first = Some(choice);
            } else {
                rest.push(choice);
            }
            Some(())
        })?;
        Some(Choices { first, rest })
    }

    fn choice(&mut self) -> Option<StreamChoice<'a>> {
        let mut seen = Seen::default();
        let mut delta = None;
        let mut text = Text(None);
        self.object(|r, key| {
            match key {
                b"delta" => {
                    seen.first(1)?;
                    delta = r.nullable(Self::delta)?;
                }
                b"text" => {
                    seen.first(2)?;
                    text = r.text()?;
                }
                _ => r.skip()?,
            }
            Some(())
        })?;
        Some(StreamChoice { delta, text })
    }

    fn delta(&mut self) -> Option<Delta<'a>> {
        let mut seen = Seen::default();
        let mut delta = Delta {
            content: Text(None),
            refusal: Text(None),
            tool_calls: None,
            function_call: None,
        };
        self.object(|r, key| {
            match key {
                b"content" => {
                    seen.first(1)?;
                    delta.content = r.text()?;
                }
                b"refusal" => {
                    seen.first(2)?;
                    delta.refusal = r.text()?;
                }
                b"tool_calls" => {
                    seen.first(4)?;
                    delta.tool_calls = r.nullable(Self::tool_calls)?;
                }
                b"function_call" => {
                    seen.first(8)?;
                    delta.function_call = r.nullable(Self::function)?;
                }
                _ => r.skip()?,
            }
            Some(())
        })?;
        Some(delta)
    }

    fn tool_calls(&mut self) -> Option<Vec<ToolCallDelta<'a>>> {
        let mut calls = Vec::new();
        self.array(|r| {
            let mut seen = Seen::default();
            let mut function = None;
            r.object(|r, key| {
                if key == b"function" {
                    seen.first(1)?;
                    function = r.nullable(Self::function)?;
                } else {
                    r.skip()?;
                }
                Some(())
            })?;
            calls.push(ToolCallDelta { function });
            Some(())
        })?;
        Some(calls)
    }

    fn function(&mut self) -> Option<FunctionDelta<'a>> {
        let mut seen = Seen::default();
        let mut name = Text(None);
        let mut arguments = Text(None);
        self.object(|r, key| {
            match key {
                b"name" => {
                    seen.first(1)?;
                    name = r.text()?;
                }
                b"arguments" => {
                    seen.first(2)?;
                    arguments = r.text()?;
                }
                _ => r.skip()?,
            }
            Some(())
        })?;
        Some(FunctionDelta { name, arguments })
    }
}

/// `raw` (a string's bytes between its quotes, already checked) with its escapes resolved;
/// `None` when it has a `\u` escape.
fn unescape(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        out.push(match *rest.as_bytes().get(at + 1)? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            _ => return None,
        });
        rest = &rest[at + 2..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use rand::prelude::*;

    use super::*;

    fn serde_reads(payload: &[u8]) -> Option<StreamEvent<'_>> {
        serde_json::from_slice::<StreamEvent<'_>>(payload).ok()
    }

    /// Whether the reader answered for `payload`; when it did, serde reads the same event.
    fn agrees(payload: &[u8]) -> bool {
        let Some(fast) = read(payload) else {
            return false;
        };
        match serde_reads(payload) {
            Some(typed) => assert_eq!(fast, typed, "{}", String::from_utf8_lossy(payload)),
            None => panic!(
                "read an event serde refuses: {}",
                String::from_utf8_lossy(payload)
            ),
        }
        true
    }

    const FILTERS: &str = r#"{"hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}"#;

    /// Events as Azure OpenAI and the simulator send them: each is read here, as serde reads it.
    #[test]
    fn the_events_streams_carry_are_read_as_serde_reads_them() {
        let events = [
            // Azure's first chunk: prompt filter results, no choices.
            format!(
                r#"{{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{{"prompt_index":0,"content_filter_results":{FILTERS}}}]}}"#
            ),
            r#"{"choices":[{"content_filter_results":{},"delta":{"content":"","refusal":null,"role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],"created":1733000000,"id":"chatcmpl-9a","model":"gpt-4o","object":"chat.completion.chunk","system_fingerprint":"fp_1","usage":null}"#.to_owned(),
            format!(
                r#"{{"choices":[{{"content_filter_results":{FILTERS},"delta":{{"content":" world"}},"finish_reason":null,"index":0,"logprobs":null}}],"created":1733000000,"id":"chatcmpl-9a","model":"gpt-4o-2024-08-06","object":"chat.completion.chunk","system_fingerprint":"fp_1"}}"#
            ),
            r#"{"choices":[{"delta":{"content":"line\n\n\"quoted\" back\\slash \/ \t tab \b\f\r"},"index":0}],"id":"x"}"#.to_owned(),
            r#"{"choices":[{"delta":{"content":"héllo wörld 😀 日本"},"index":0}]}"#.to_owned(),
            r#"{"choices":[{"delta":{},"finish_reason":"stop","index":0,"logprobs":null}],"usage":null}"#.to_owned(),
            r#"{"choices":[{"delta":{"refusal":"I can't help with that."},"index":0}]}"#.to_owned(),
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]},"index":0}]}"#.to_owned(),
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\": \"Paris\"}"}},{"index":1,"function":null}]},"index":0}]}"#.to_owned(),
            r#"{"choices":[{"delta":{"function_call":{"name":"f","arguments":"{}"},"tool_calls":null},"index":0}]}"#.to_owned(),
            r#"{"choices":[{"text":" legacy","index":0,"logprobs":null,"finish_reason":null}],"object":"text_completion"}"#.to_owned(),
            r#"{"choices":[{"delta":{"content":"a"},"index":0},{"delta":{"content":"b"},"index":1},{"delta":null,"index":2}]}"#.to_owned(),
            r#"{"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi","logprobs":[]}"#.to_owned(),
            r#"{"type":"response.output_item.added","output_index":0,"item":{"id":"msg_1","type":"message","status":"in_progress","content":[],"role":"assistant"},"sequence_number":2}"#.to_owned(),
            "{ \"choices\" : [ { \"delta\" : { \"content\" : \"x\" } } ] ,\n\t\"id\":\r\"y\" , \"n\": -0.5e+10, \"m\": [1, 2.25, -3E-2, 0, true, false, null, \"\\u00e9\"]}".to_owned(),
            r#"{"choices":null,"id":7,"type":true,"delta":["x"],"error":null,"code":null,"response":null}"#.replace("\"id\":7,", ""),
            r#"{}"#.to_owned(),
            // The usage chunk Sluice asks for, and its Responses names.
            r#"{"choices":[],"created":1,"id":"chatcmpl-9a","model":"gpt-4o","object":"chat.completion.chunk","usage":{"completion_tokens":16,"completion_tokens_details":{"reasoning_tokens":0},"prompt_tokens":25,"prompt_tokens_details":{"cached_tokens":0},"total_tokens":41}}"#.to_owned(),
            r#"{"usage":{"input_tokens":0,"output_tokens":18446744073709551615,"total_tokens":null}}"#.to_owned(),
            r#"{"usage":{}}"#.to_owned(),
            // Responses lifecycle events.
            r#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_67ccd2bed1ec8190","object":"response","created_at":1741476542,"status":"in_progress","error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"model":"gpt-4o","output":[],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":null,"user":null,"metadata":{}}}"#.to_owned(),
            r#"{"type":"response.completed","sequence_number":9,"response":{"id":"resp_1","status":"completed","output":[{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi \"there\"","annotations":[]}]}],"usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48}}}"#.to_owned(),
            r#"{"type":"response.failed","response":{"id":"resp_2","error":{"code":"server_error","message":"The model failed."},"incomplete_details":null}}"#.to_owned(),
            r#"{"type":"response.incomplete","response":{"id":"resp_3","incomplete_details":{"reason":"max_output_tokens","reason":"content_filter"},"error":{"code":null,"code":"x"}}}"#.to_owned(),
            r#"{"type":"response.failed","response":{"error":{"code":true,"reason":[1]},"incomplete_details":{}}}"#.to_owned(),
        ];
        for event in &events {
            assert!(agrees(event.as_bytes()), "left to serde: {event}");
        }
    }

    /// What the reader leaves to serde: it answers `None`, whatever serde makes of the event.
    #[test]
    fn what_the_reader_does_not_handle_is_left_to_serde() {
        let left = [
            // Kept by serde, not here.
            r#"{"choices":[{"delta":{"content":"caf\u00e9"}}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":-1}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1.0}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1e2}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":18446744073709551616}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":"1"}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1,"input_tokens":1}}"#,
            r#"{"choices":[],"usage":{"output_tokens":1,"completion_tokens":1}}"#,
            r#"{"choices":[],"usage":{"total_tokens":1,"total_tokens":1}}"#,
            r#"{"choices":[],"usage":{"total_tokens":01}}"#,
            r#"{"choices":[],"usage":[]}"#,
            r#"{"choices":[],"usage":0}"#,
            r#"{"type":"response.failed","response":"x"}"#,
            r#"{"type":"response.failed","response":{"error":"boom"}}"#,
            r#"{"type":"response.failed","response":{"error":{"code":42}}}"#,
            r#"{"type":"response.failed","response":{"error":{"code":1.5}}}"#,
            r#"{"type":"response.incomplete","response":{"incomplete_details":[]}}"#,
            r#"{"type":"response.incomplete","response":{"incomplete_details":{"reason":"\u0061"}}}"#,
            r#"{"type":"response.created","response":{"id":"a","id":"b"}}"#,
            r#"{"type":"response.created","response":{"usage":null,"usage":null}}"#,
            r#"{"type":"response.created","response":{"error":null,"error":null}}"#,
            r#"{"type":"response.created","response":{"incomplete_details":null,"incomplete_details":null}}"#,
            r#"{"type":"response.created","response":null,"response":null}"#,
            r#"{"error":{"code":"server_error","message":"boom"}}"#,
            r#"{"type":"error","code":"rate_limit","message":"slow down"}"#,
            r#"{"choices":[{"delta":{"content":5}}]}"#,
            r#"{"choices":[{"text":-1e999}]}"#,
            r#"{"ch\u006fices":[]}"#,
            r#"{"chöices":[]}"#,
            r#"{"choices":[{"delta":["x"]}]}"#,
            r#"{"choices":[null]}"#,
            r#"{"choices":{}}"#,
            r#"{"choices":[{"delta":{"tool_calls":{}}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[5]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":"f"}]}}]}"#,
            r#"{"choices":[{"delta":{"function_call":[]}}]}"#,
            // Refused by serde too.
            r#"{"choices":[],"choices":[]}"#,
            r#"{"id":"a","id":"b"}"#,
            r#"{"choices":[{"delta":{"content":"a","content":"b"}}]}"#,
            r#"{"choices":[{"text":"a","text":"b"}]}"#,
            r#"{"choices":[{"delta":null,"delta":null}]}"#,
            r#"{"usage":null,"usage":null}"#,
            r#"{"error":null,"error":null}"#,
            r#"{"code":null,"code":null}"#,
            r#"{"response":null,"response":null}"#,
            r#"{"type":"a","type":"a"}"#,
            r#"{"delta":"a","delta":"a"}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":null,"function":null}]}}]}"#,
            r#"{"choices":[{"delta":{"function_call":{"name":"a","name":"b"}}}]}"#,
            r#"{"choices":[{"delta":{"function_call":{"arguments":"a","arguments":"b"}}}]}"#,
            r#"{"choices":[],}"#,
            r#"{"choices":[1,]}"#,
            r#"{"choices" []}"#,
            r#"{"choices":[]"#,
            r#"{"choices":[]} x"#,
            r#"{"n":01}"#,
            r#"{"n":1.}"#,
            r#"{"n":1e}"#,
            r#"{"n":-}"#,
            r#"{"n":+1}"#,
            r#"{"n":tru}"#,
            r#"{"n":nulls}"#,
            "{\"n\":\"a\u{1}b\"}",
            r#"{"n":"\x"}"#,
            r#"{"n":"\u12g4"}"#,
            r#"{"choices":[{"delta":{"content":"\u12"}}]}"#,
            r#"{"n":"open}"#,
            r#"{"n":'x'}"#,
            r#"{n:1}"#,
            r#"[]"#,
        ];
        for event in left {
            assert_eq!(read(event.as_bytes()), None, "{event}");
        }
        // Nesting: up to the limit is walked, past it is left.
        let nested = |depth: usize| {
            format!(
                r#"{{"choices":[],"x":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            )
        };
        assert!(agrees(nested(MAX_DEPTH as usize - 1).as_bytes()));
        assert_eq!(read(nested(MAX_DEPTH as usize).as_bytes()), None);
        // Invalid UTF-8 in a kept string is left to serde (which refuses it); in a skipped one it
        // is read past, as serde reads past it.
        assert_eq!(read(b"{\"choices\":[{\"text\":\"\xff\"}]}"), None);
        assert!(serde_reads(b"{\"choices\":[{\"text\":\"\xff\"}]}").is_none());
        assert!(agrees(b"{\"choices\":[],\"model\":\"\xff\"}"));
    }

    /// The word-at-a-time scans find the first stop byte, as a byte-by-byte loop does, at every
    /// length around their word and 16-byte boundaries.
    #[test]
    fn word_scans_find_the_first_stop() {
        const BYTES: &[u8] = b"a \"\\\x01\x1f\x20\x21\x7f\x80\xff\x5b\x5d";
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..20_000 {
            let len = rng.random_range(0..48);
            // Mostly plain bytes, so stops fall at every position.
            let b: Vec<u8> = (0..len)
                .map(|_| match rng.random_range(0..12) {
                    0 => BYTES[rng.random_range(0..BYTES.len())],
                    _ => b'a' + rng.random_range(0..26),
                })
                .collect();
            let plain = b
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                .unwrap_or(b.len());
            assert_eq!(plain_run(&b), plain, "{b:?}");
            let quote = b.iter().position(|&c| c == b'"' || c == b'\\');
            assert_eq!(quote_or_backslash(&b), quote, "{b:?}");
        }
    }

    #[test]
    fn unescaping_resolves_every_short_escape() {
        assert_eq!(
            unescape(r#"a\"b\\c\/d\be\ff\ng\rh\ti\\"#).as_deref(),
            Some("a\"b\\c/d\u{8}e\u{c}f\ng\rh\ti\\")
        );
        assert_eq!(unescape("plain").as_deref(), Some("plain"));
        assert_eq!(unescape(r"\u0041"), None);
    }

    /// A random JSON value, with the odd corners of the grammar.
    fn value(rng: &mut StdRng, depth: u32, out: &mut String) {
        let pick = if depth > 3 {
            rng.random_range(0..6)
        } else {
            rng.random_range(0..8)
        };
        match pick {
            0 => out.push_str("null"),
            1 => out.push_str(["true", "false"][rng.random_range(0..2)]),
            2 => out.push_str(
                [
                    "0",
                    "-0",
                    "12",
                    "-7",
                    "3.25",
                    "1e5",
                    "2E-3",
                    "-0.5e+2",
                    "184467440737095516150",
                    "1e400",
                ][rng.random_range(0..10)],
            ),
            3..=5 => string(rng, out),
            6 => array_of(rng, out, 4, &mut |rng, out| {
                ws(rng, out);
                value(rng, depth + 1, out);
            }),
            _ => {
                out.push('{');
                for i in 0..rng.random_range(0..4) {
                    if i > 0 {
                        out.push(',');
                    }
                    string(rng, out);
                    out.push(':');
                    value(rng, depth + 1, out);
                }
                out.push('}');
            }
        }
    }

    /// An array of fewer than `max` elements, each written by `element`.
    fn array_of(
        rng: &mut StdRng,
        out: &mut String,
        max: usize,
        element: &mut dyn FnMut(&mut StdRng, &mut String),
    ) {
        out.push('[');
        for i in 0..rng.random_range(0..max) {
            if i > 0 {
                out.push(',');
            }
            element(rng, out);
        }
        out.push(']');
    }

    fn string(rng: &mut StdRng, out: &mut String) {
        out.push('"');
        for _ in 0..rng.random_range(0..8) {
            out.push_str(
                [
                    "a",
                    " ",
                    "word",
                    "é",
                    "😀",
                    "\\n",
                    "\\\"",
                    "\\\\",
                    "\\/",
                    "\\t",
                    "\\u00e9",
                    "\\ud83d\\ude00",
                    "content",
                    "delta",
                ][rng.random_range(0..14)],
            );
        }
        out.push('"');
    }

    fn ws(rng: &mut StdRng, out: &mut String) {
        if rng.random_range(0..4) == 0 {
            out.push_str([" ", "\n", "\t", "\r\n "][rng.random_range(0..4)]);
        }
    }

    /// A member `key` whose value is usually of the expected kind (`kinds`), sometimes anything.
    fn member(
        rng: &mut StdRng,
        key: &str,
        out: &mut String,
        expected: impl FnOnce(&mut StdRng, &mut String),
    ) {
        ws(rng, out);
        out.push('"');
        out.push_str(key);
        out.push('"');
        ws(rng, out);
        out.push(':');
        ws(rng, out);
        if rng.random_range(0..8) == 0 {
            value(rng, 2, out);
        } else {
            expected(rng, out);
        }
        ws(rng, out);
    }

    fn object_of(
        rng: &mut StdRng,
        out: &mut String,
        keys: &[&str],
        member_value: &mut dyn FnMut(&mut StdRng, &str, &mut String),
    ) {
        out.push('{');
        let n = rng.random_range(0..=keys.len() + 1);
        for i in 0..n {
            if i > 0 {
                out.push(',');
            }
            // Mostly the keys the reader knows (sometimes twice), else another.
            let key = if rng.random_range(0..5) == 0 {
                ["index", "logprobs", "role", "finish_reason", "x"][rng.random_range(0..5)]
            } else {
                keys[rng.random_range(0..keys.len())]
            };
            let mut v = String::new();
            member_value(rng, key, &mut v);
            member(rng, key, out, |_, out| out.push_str(&v));
        }
        out.push('}');
    }

    fn text_or_null(rng: &mut StdRng, out: &mut String) {
        if rng.random_range(0..6) == 0 {
            out.push_str("null");
        } else {
            string(rng, out);
        }
    }

    fn function(rng: &mut StdRng, out: &mut String) {
        object_of(rng, out, &["name", "arguments"], &mut |rng, _, out| {
            text_or_null(rng, out)
        });
    }

    fn delta(rng: &mut StdRng, out: &mut String) {
        object_of(
            rng,
            out,
            &["content", "refusal", "tool_calls", "function_call"],
            &mut |rng, key, out| match key {
                "tool_calls" => array_of(rng, out, 3, &mut |rng, out| {
                    object_of(
                        rng,
                        out,
                        &["function", "id", "type"],
                        &mut |rng, key, out| {
                            if key == "function" {
                                function(rng, out);
                            } else {
                                string(rng, out);
                            }
                        },
                    )
                }),
                "function_call" => function(rng, out),
                _ => text_or_null(rng, out),
            },
        );
    }

    /// A `usage` object, its counts sometimes of the kinds serde refuses.
    fn usage(rng: &mut StdRng, out: &mut String) {
        object_of(
            rng,
            out,
            &[
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "input_tokens",
                "output_tokens",
                "prompt_tokens_details",
            ],
            &mut |rng, key, out| {
                if key.ends_with("details") {
                    value(rng, 2, out);
                } else {
                    out.push_str(
                        [
                            "0",
                            "7",
                            "1234",
                            "null",
                            "18446744073709551615",
                            "18446744073709551616",
                            "-1",
                            "1.5",
                            "2e3",
                            "01",
                        ][rng.random_range(0..10)],
                    );
                }
            },
        );
    }

    fn event(rng: &mut StdRng) -> String {
        let mut out = String::new();
        ws(rng, &mut out);
        object_of(
            rng,
            &mut out,
            &[
                "choices", "id", "type", "delta", "usage", "error", "code", "response", "model",
                "object",
            ],
            &mut |rng, key, out| match key {
                "choices" => array_of(rng, out, 3, &mut |rng, out| {
                    object_of(
                        rng,
                        out,
                        &["delta", "text", "content_filter_results"],
                        &mut |rng, key, out| match key {
                            "delta" => delta(rng, out),
                            "text" => text_or_null(rng, out),
                            _ => value(rng, 1, out),
                        },
                    )
                }),
                "usage" => usage(rng, out),
                "response" => object_of(
                    rng,
                    out,
                    &[
                        "id",
                        "usage",
                        "error",
                        "incomplete_details",
                        "output",
                        "status",
                    ],
                    &mut |rng, key, out| match key {
                        "error" | "incomplete_details" => match rng.random_range(0..4) {
                            0 => out.push_str("null"),
                            1 => value(rng, 2, out),
                            _ => object_of(
                                rng,
                                out,
                                &["code", "reason", "message"],
                                &mut |rng, key, out| match (key, rng.random_range(0..5)) {
                                    ("code", 0) => {
                                        out.push_str(["42", "-1", "1.5"][rng.random_range(0..3)])
                                    }
                                    _ => text_or_null(rng, out),
                                },
                            ),
                        },
                        "usage" => usage(rng, out),
                        "id" | "status" => text_or_null(rng, out),
                        _ => value(rng, 1, out),
                    },
                ),
                "error" | "code" => out.push_str("null"),
                "model" | "object" => value(rng, 1, out),
                _ => text_or_null(rng, out),
            },
        );
        ws(rng, &mut out);
        out
    }

    /// `event` with one random edit: a byte dropped, changed or added, or the end cut off.
    fn mutate(rng: &mut StdRng, event: &[u8]) -> Vec<u8> {
        const BYTES: &[u8] = b"\"{}[],:\\ 0123456789.eE+-ntfurl\x01\x1f\xff\xc3";
        let mut b = event.to_vec();
        let at = rng.random_range(0..=b.len());
        let byte = BYTES[rng.random_range(0..BYTES.len())];
        match rng.random_range(0..4) {
            0 if at < b.len() => {
                b.remove(at);
            }
            1 if at < b.len() => b[at] = byte,
            2 => b.insert(at, byte),
            _ => b.truncate(at),
        }
        b
    }

    /// Over thousands of generated events and as many broken ones, the reader never reads an
    /// event otherwise than serde: whenever it answers, serde reads the same.
    #[test]
    fn generated_and_broken_events_read_as_serde_reads_them() {
        let mut rng = StdRng::seed_from_u64(20261202);
        let (mut events, mut read_events, mut broken_read) = (0, 0, 0);
        for _ in 0..20_000 {
            let event = event(&mut rng);
            events += 1;
            if agrees(event.as_bytes()) {
                read_events += 1;
            }
            for _ in 0..4 {
                if agrees(&mutate(&mut rng, event.as_bytes())) {
                    broken_read += 1;
                }
            }
        }
        // The generator reaches both sides: most events are read here, some are left.
        assert!(read_events > events / 4, "{read_events} of {events}");
        assert!(read_events < events, "{read_events} of {events}");
        assert!(broken_read > 0);
    }
}
