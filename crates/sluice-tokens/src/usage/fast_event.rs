//! A hand-written reader for the events a stream carries by the hundred: chat and completions
//! chunks, and Responses delta events.
//!
//! serde's typed parse of such an event cost about 2 µs, most of it walking members nobody
//! reads (`content_filter_results`, `logprobs`, `system_fingerprint`). This reader walks the
//! event once, checks it at least as strictly as serde_json does, and builds the same
//! [`StreamEvent`]. It answers only when it is sure of serde's answer; it gives up (`None`) on
//! anything it does not handle itself:
//!
//! - malformed JSON of any kind, or nesting deeper than [`MAX_DEPTH`](crate::json_walk::MAX_DEPTH);
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
use crate::json_walk::{Reader, Seen, unescape};
use crate::lenient::{Code, Detail, DetailFields, Text};

/// The event in `payload`, read as serde would read it, or `None` when the reader leaves it to
/// serde.
pub(super) fn read(payload: &[u8]) -> Option<StreamEvent<'_>> {
    let mut r = Reader::new(payload);
    let event = r.event()?;
    r.at_end().then_some(event)
}

/// A JSON answer's `usage` value (`null` or an object), read as serde reads an
/// `Option<RawUsage>`, or `None` when the reader leaves it to serde.
pub(super) fn read_usage(raw: &[u8]) -> Option<Option<RawUsage>> {
    let mut r = Reader::new(raw);
    let usage = r.nullable(Reader::usage)?;
    r.at_end().then_some(usage)
}

impl<'a> Reader<'a> {
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

#[cfg(test)]
mod tests {
    use rand::prelude::*;

    use super::*;
    use crate::json_walk::MAX_DEPTH;
    use crate::json_walk::generate::{array_of, mutate, object_of, string, value, ws};

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

    /// A JSON answer's `usage` value, generated and broken: whenever the reader answers, serde
    /// reads the same `Option<RawUsage>`.
    #[test]
    fn usage_values_read_as_serde_reads_them() {
        let mut rng = StdRng::seed_from_u64(17);
        let (mut answered, mut total) = (0, 0);
        for _ in 0..20_000 {
            let mut raw = String::new();
            if rng.random_range(0..8) == 0 {
                raw.push_str(" null ");
            } else {
                usage(&mut rng, &mut raw);
            }
            for bytes in [raw.as_bytes().to_vec(), mutate(&mut rng, raw.as_bytes())] {
                total += 1;
                let Some(read) = read_usage(&bytes) else {
                    continue;
                };
                answered += 1;
                let typed =
                    serde_json::from_slice::<Option<RawUsage>>(&bytes).unwrap_or_else(|e| {
                        panic!(
                            "read a usage serde refuses ({e}): {}",
                            String::from_utf8_lossy(&bytes)
                        )
                    });
                assert_eq!(read, typed, "{}", String::from_utf8_lossy(&bytes));
            }
        }
        assert!(answered * 4 > total, "{answered} of {total}");
        assert_eq!(
            read_usage(br#"{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":0}}"#),
            Some(Some(RawUsage {
                prompt_tokens: Some(12),
                completion_tokens: Some(5),
                total_tokens: Some(17),
            }))
        );
        assert_eq!(read_usage(b"null"), Some(None));
        assert_eq!(read_usage(b"7"), None, "left to serde");
    }
}
