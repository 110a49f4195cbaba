//! Drops the usage chunk the gateway asked for on a client's behalf from a chat stream.

use std::fmt;

use bytes::Bytes;
use memchr::{memchr2, memmem};
use serde::Deserialize;

use crate::lenient::Shape;

/// The largest partial event held back while waiting for its end; a larger event is passed on
/// unfiltered.
const MAX_HELD_BYTES: usize = 1024 * 1024;

/// Removes the usage-only chunk from a chat/completions SSE stream, for when the gateway added
/// `stream_options.include_usage` to a request that did not ask for it (so it can read usage)
/// and the client must not see the extra chunk.
///
/// The usage chunk is an event whose data (its `data:` lines joined) is a JSON object with
/// `"choices": []` (an empty array) and a `usage` that is an object (not `null`). It is removed
/// whole: its lines and the blank line ending it. Every other event — Azure's first chunk
/// (`choices: []` with `prompt_filter_results`, no usage), chunks with `"usage": null`,
/// `data: [DONE]`, comments — passes byte for byte. (Only events whose text has `"choices"` and
/// `"usage"` literally are parsed, so keys written with escapes are not recognised; no backend
/// writes them so.)
///
/// Events end with a blank line; lines end with `\n`, `\r\n` or `\r`, mixed freely, and chunk
/// boundaries may fall anywhere (a `\r\n` split between chunks is one line ending). The output
/// never depends on where the chunks were split. An event whose end has not arrived yet is held
/// back until it has (a client cannot use half an event anyway), in one buffer holding at most
/// 1 MiB: an event larger than that is not filtered — what is held goes out at once, and the
/// rest of the event as it arrives. A chunk that holds only whole events, none removed, after a
/// chunk that ended between events, is returned as is (the same [`Bytes`], no copy); whole
/// events before a partial one come back as a slice of the chunk (no copy either).
#[derive(Default)]
pub struct UsageChunkFilter {
    /// The current event's bytes from earlier chunks (empty between events, or when `passing`).
    held: Vec<u8>,
    /// The current event outgrew the cap: its bytes go out unfiltered until it ends.
    passing: bool,
    /// The last chunk ended inside a line (not right after a line ending): the next line
    /// ending ends that line, and is not a blank line.
    mid_line: bool,
    /// The last chunk ended with a `\r`, so a `\n` starting the next one is part of that line
    /// ending.
    pending_lf: PendingLf,
}

/// Who owns a `\n` that may follow a `\r` at the end of the previous chunk.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum PendingLf {
    /// The previous chunk did not end with a `\r`.
    #[default]
    None,
    /// The `\r` ended a line inside the current event.
    InEvent,
    /// The `\r` ended an event that was passed on.
    AfterKept,
    /// The `\r` ended an event that was removed.
    AfterRemoved,
}

impl fmt::Debug for UsageChunkFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UsageChunkFilter")
            .field("held_bytes", &self.held.len())
            .field("passing", &self.passing)
            .field("mid_line", &self.mid_line)
            .field("pending_lf", &self.pending_lf)
            .finish()
    }
}

impl UsageChunkFilter {
    /// A filter at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next body chunk; returns what may go to the client now (possibly empty).
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        let mut out = Out::new(&chunk);
        let bytes = &chunk[..];
        // Where the current event's bytes begin in `chunk`, and where scanning for line endings
        // begins.
        let mut event_start = 0;
        let mut line_start = 0;
        if bytes.first() == Some(&b'\n') {
            // The rest of a `\r\n` split between chunks: not a line ending of its own.
            match std::mem::take(&mut self.pending_lf) {
                PendingLf::None => {}
                PendingLf::InEvent => line_start = 1,
                PendingLf::AfterKept => {
                    out.push(0, 1);
                    (line_start, event_start) = (1, 1);
                }
                PendingLf::AfterRemoved => (line_start, event_start) = (1, 1),
            }
        } else if !bytes.is_empty() {
            self.pending_lf = PendingLf::None;
        }
        while let Some(off) = memchr2(b'\n', b'\r', &bytes[line_start..]) {
            let at = line_start + off;
            let mut next = at + 1;
            let cr_at_end = bytes[at] == b'\r' && next == bytes.len();
            if bytes[at] == b'\r' && bytes.get(next) == Some(&b'\n') {
                next += 1;
            }
            let blank = at == line_start && !self.mid_line;
            self.mid_line = false;
            line_start = next;
            if !blank {
                if cr_at_end {
                    self.pending_lf = PendingLf::InEvent;
                }
                continue;
            }
            // The event ends at `next`.
            let kept = self.event_end(event_start, next, &mut out);
            if cr_at_end {
                self.pending_lf = if kept {
                    PendingLf::AfterKept
                } else {
                    PendingLf::AfterRemoved
                };
            }
            event_start = next;
        }
        if line_start < bytes.len() {
            self.mid_line = true;
        }
        self.event_part(event_start, &mut out);
        out.into_bytes()
    }

    /// At the end of the stream: what is still held (an event that never got its blank line),
    /// unless that is itself a usage chunk. The filter is then back at its start state.
    pub fn finish(&mut self) -> Bytes {
        let held = std::mem::take(&mut self.held);
        *self = Self::default();
        if is_usage_chunk(&held) {
            Bytes::new()
        } else {
            Bytes::from(held)
        }
    }

    /// The current event ends with `chunk[from..to]`: passes it on (returns true) or drops it.
    fn event_end(&mut self, from: usize, to: usize, out: &mut Out) -> bool {
        let chunk = out.chunk;
        if std::mem::take(&mut self.passing) {
            out.push(from, to);
            return true;
        }
        if self.held.is_empty() {
            let event = &chunk[from..to];
            let keep = event.len() > MAX_HELD_BYTES || !is_usage_chunk(event);
            if keep {
                out.push(from, to);
            }
            return keep;
        }
        let mut held = std::mem::take(&mut self.held);
        let last = &chunk[from..to];
        if held.len() + last.len() > MAX_HELD_BYTES {
            out.push_held(held);
            out.push(from, to);
            return true;
        }
        held.extend_from_slice(last);
        let keep = !is_usage_chunk(&held);
        if keep {
            out.push_held(held);
        }
        keep
    }

    /// `chunk[from..]` (possibly empty) is the start or middle of an event whose end has not
    /// arrived: hold it, or pass it on when it is (or has become) too large.
    fn event_part(&mut self, from: usize, out: &mut Out) {
        let chunk = out.chunk;
        let part = &chunk[from..];
        if !self.passing && self.held.len() + part.len() > MAX_HELD_BYTES {
            self.passing = true;
            let held = std::mem::take(&mut self.held);
            out.push_held(held);
        }
        if self.passing {
            out.push(from, chunk.len());
        } else {
            self.held.extend_from_slice(part);
        }
    }
}

/// The output of one `feed`: nothing, one range of the input chunk (no copy), or copied bytes.
struct Out<'c> {
    chunk: &'c Bytes,
    state: OutState,
}

enum OutState {
    Empty,
    Range(usize, usize),
    Owned(Vec<u8>),
}

impl<'c> Out<'c> {
    fn new(chunk: &'c Bytes) -> Self {
        Out {
            chunk,
            state: OutState::Empty,
        }
    }

    /// Appends `chunk[from..to]`.
    fn push(&mut self, from: usize, to: usize) {
        if from == to {
            return;
        }
        match &mut self.state {
            OutState::Empty => self.state = OutState::Range(from, to),
            OutState::Range(_, end) if *end == from => *end = to,
            OutState::Range(a, b) => {
                let mut v = Vec::with_capacity(*b - *a + to - from);
                v.extend_from_slice(&self.chunk[*a..*b]);
                v.extend_from_slice(&self.chunk[from..to]);
                self.state = OutState::Owned(v);
            }
            OutState::Owned(v) => v.extend_from_slice(&self.chunk[from..to]),
        }
    }

    /// Appends bytes held from earlier chunks.
    fn push_held(&mut self, held: Vec<u8>) {
        if held.is_empty() {
            return;
        }
        match &mut self.state {
            OutState::Empty => self.state = OutState::Owned(held),
            OutState::Range(a, b) => {
                let mut v = Vec::with_capacity(*b - *a + held.len());
                v.extend_from_slice(&self.chunk[*a..*b]);
                v.extend_from_slice(&held);
                self.state = OutState::Owned(v);
            }
            OutState::Owned(v) => v.extend_from_slice(&held),
        }
    }

    fn into_bytes(self) -> Bytes {
        match self.state {
            OutState::Empty => Bytes::new(),
            // No copy (the whole chunk gives back the same bytes).
            OutState::Range(a, b) => self.chunk.slice(a..b),
            OutState::Owned(v) => Bytes::from(v),
        }
    }
}

/// The parts of an event's data that decide whether it is the usage chunk.
#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    choices: Option<Shape>,
    #[serde(default)]
    usage: Option<Shape>,
}

/// `event` (its lines, blank line included or not) is a usage-only chunk.
fn is_usage_chunk(event: &[u8]) -> bool {
    let mut data: Option<Vec<u8>> = None;
    let mut single: Option<&[u8]> = None;
    // A `\r\n` splits into a line and an empty one; empty lines are no fields, so that is fine.
    for line in event.split(|&b| b == b'\n' || b == b'\r') {
        let value = if line == b"data" {
            &b""[..]
        } else if let Some(v) = line.strip_prefix(b"data:") {
            v.strip_prefix(b" ").unwrap_or(v)
        } else {
            continue;
        };
        match (&mut data, single) {
            (Some(joined), _) => {
                joined.push(b'\n');
                joined.extend_from_slice(value);
            }
            (None, Some(first)) => {
                let mut joined = first.to_vec();
                joined.push(b'\n');
                joined.extend_from_slice(value);
                data = Some(joined);
            }
            (None, None) => single = Some(value),
        }
    }
    let Some(payload) = data.as_deref().or(single) else {
        return false;
    };
    let payload = payload.trim_ascii();
    if payload.first() != Some(&b'{')
        || !member_starts(payload, b"\"choices\"", b"[]")
        || !member_starts(payload, b"\"usage\"", b"{")
    {
        return false;
    }
    matches!(
        serde_json::from_slice::<Probe>(payload),
        Ok(Probe {
            choices: Some(Shape::EmptyArray),
            usage: Some(Shape::Object),
        })
    )
}

/// A cheap pre-check before parsing: somewhere `json` has `key`, then `:` and `value`'s bytes,
/// with JSON whitespace allowed around each.
fn member_starts(json: &[u8], key: &[u8], value: &[u8]) -> bool {
    memmem::find_iter(json, key).any(|at| {
        let mut rest = json[at + key.len()..].trim_ascii_start();
        let Some(after_colon) = rest.strip_prefix(b":") else {
            return false;
        };
        rest = after_colon;
        value.iter().all(|b| {
            rest = rest.trim_ascii_start();
            match rest.split_first() {
                Some((first, tail)) if first == b => {
                    rest = tail;
                    true
                }
                _ => false,
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks`, returning each feed's output and the finish output, joined.
    fn run(chunks: &[&[u8]]) -> Vec<u8> {
        let mut f = UsageChunkFilter::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&f.feed(Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&f.finish());
        assert!(f.finish().is_empty(), "finish leaves nothing behind");
        out
    }

    /// The output for `input` fed whole, split in two at every byte, in three at every pair of
    /// bytes (short inputs), and byte by byte, which must all agree.
    fn run_all_ways(input: &[u8]) -> Vec<u8> {
        let whole = run(&[input]);
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            assert_eq!(run(&[a, b]), whole, "split at {at}");
        }
        if input.len() <= 400 {
            for i in 0..=input.len() {
                for j in i..=input.len() {
                    let parts = [&input[..i], &input[i..j], &input[j..]];
                    assert_eq!(run(&parts), whole, "split at {i} and {j}");
                }
            }
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(&bytes), whole, "byte by byte");
        whole
    }

    /// Azure's first event (content filtering on): empty choices, no usage.
    const AZURE_FIRST: &str = r#"data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}"#;
    const USAGE_CHUNK: &str = r#"data: {"choices":[],"created":1727000000,"id":"chatcmpl-A1","model":"gpt-4o-2024-08-06","object":"chat.completion.chunk","usage":{"completion_tokens":4,"prompt_tokens":9,"total_tokens":13}}"#;

    fn content(text: &str) -> String {
        format!(
            r#"data: {{"choices":[{{"delta":{{"content":{}}},"finish_reason":null,"index":0}}],"id":"chatcmpl-A1","object":"chat.completion.chunk","usage":null}}"#,
            serde_json::json!(text)
        )
    }

    /// A chat stream's events (without their blank lines), the usage chunk included or not.
    fn events(with_usage: bool) -> Vec<String> {
        let mut events = vec![AZURE_FIRST.to_owned(), content("Hi"), content(" there")];
        if with_usage {
            events.push(USAGE_CHUNK.to_owned());
        }
        events.push("data: [DONE]".to_owned());
        events
    }

    fn join(events: &[String], eol: &str) -> String {
        events.iter().map(|e| format!("{e}{eol}{eol}")).collect()
    }

    #[test]
    fn usage_chunk_is_removed_at_every_split() {
        for eol in ["\n", "\r\n", "\r"] {
            let input = join(&events(true), eol);
            let expected = join(&events(false), eol);
            assert_eq!(
                String::from_utf8(run_all_ways(input.as_bytes())).unwrap(),
                expected,
                "{eol:?}"
            );
        }
    }

    #[test]
    fn mixed_line_endings() {
        let input = format!(
            "{AZURE_FIRST}\r\n\n: comment\r{}\r\r\nid: 3\r\n{USAGE_CHUNK}\n\r\n\r\ndata: [DONE]\r\r",
            content("x")
        );
        let expected = format!(
            "{AZURE_FIRST}\r\n\n: comment\r{}\r\r\n\r\ndata: [DONE]\r\r",
            content("x")
        );
        assert_eq!(
            String::from_utf8(run_all_ways(input.as_bytes())).unwrap(),
            expected
        );
        // A removed event ending in `\r` at a chunk's end takes the next chunk's `\n` with it.
        let input = format!("{USAGE_CHUNK}\r\n\r\ndata: [DONE]\r\n\r\n");
        let mut f = UsageChunkFilter::new();
        let a = f.feed(Bytes::from(format!("{USAGE_CHUNK}\r\n\r")));
        assert!(a.is_empty());
        let b = f.feed(Bytes::from_static(b"\ndata: [DONE]\r\n\r\n"));
        assert_eq!(&b[..], b"data: [DONE]\r\n\r\n");
        assert_eq!(run_all_ways(input.as_bytes()), b"data: [DONE]\r\n\r\n");
        // A kept one keeps it, and the next event is still filtered.
        let input = format!("data: [DONE]\r\n\r\n{USAGE_CHUNK}\r\r");
        let mut f = UsageChunkFilter::new();
        let a = f.feed(Bytes::from_static(b"data: [DONE]\r\n\r"));
        let b = f.feed(Bytes::from(format!("\n{USAGE_CHUNK}\r\r")));
        assert_eq!((&a[..], &b[..]), (&b"data: [DONE]\r\n\r"[..], &b"\n"[..]));
        assert_eq!(run_all_ways(input.as_bytes()), b"data: [DONE]\r\n\r\n");
    }

    #[test]
    fn other_events_pass_unchanged() {
        let cases = [
            // Empty choices, usage null or absent.
            r#"data: {"choices":[],"usage":null}"#.to_owned(),
            r#"data: {"choices":[]}"#.to_owned(),
            AZURE_FIRST.to_owned(),
            // Usage with choices, or usage not an object.
            r#"data: {"choices":[{"index":0,"delta":{}}],"usage":{"total_tokens":1}}"#.to_owned(),
            r#"data: {"choices":[],"usage":5}"#.to_owned(),
            r#"data: {"choices":[],"usage":[]}"#.to_owned(),
            r#"data: {"choices":null,"usage":{"total_tokens":1}}"#.to_owned(),
            r#"data: {"usage":{"total_tokens":1}}"#.to_owned(),
            r#"data: {"choices":{},"usage":{}}"#.to_owned(),
            // Nested or quoted lookalikes.
            r#"data: {"x":{"choices":[],"usage":{}},"choices":[{}]}"#.to_owned(),
            r#"data: {"choices":[{"delta":{"content":"\"choices\":[],\"usage\":{}"}}]}"#.to_owned(),
            // Not an object, not JSON, duplicate members, no data.
            r#"data: [{"choices":[],"usage":{}}]"#.to_owned(),
            r#"data: {"choices":[],"usage":{}"#.to_owned(),
            r#"data: {"choices":[],"usage":{},"usage":{}}"#.to_owned(),
            r#"event: {"choices":[],"usage":{}}"#.to_owned(),
            r#": {"choices":[],"usage":{}}"#.to_owned(),
            r#"datax: {"choices":[],"usage":{}}"#.to_owned(),
            "data: [DONE]".to_owned(),
            "data".to_owned(),
        ];
        for event in cases {
            let input = format!("{event}\n\n");
            assert_eq!(
                String::from_utf8(run_all_ways(input.as_bytes())).unwrap(),
                input
            );
        }
    }

    #[test]
    fn usage_chunk_shapes_that_are_removed() {
        let removed = [
            r#"data: {"choices":[],"usage":{}}"#,
            r#"data:{"choices":[],"usage":{"total_tokens":1}}"#,
            "data: {\"usage\"\t: {\"total_tokens\":1} , \"choices\" : [ ] }  ",
            // Data split over several lines, with other fields between them.
            "id: 7\nevent: message\ndata: {\"choices\":\ndata: []\n: c\ndata: ,\"usage\":{\"x\":1}}",
            "data: {\"choices\":[],\r\n: c\r\ndata: \"usage\":{}}",
            "data: {\"choices\":[],\r: c\rdata: \"usage\":{}}",
        ];
        for event in removed {
            let input = format!("data: a\n\n{event}\n\ndata: b\n\n");
            assert_eq!(
                String::from_utf8(run_all_ways(input.as_bytes())).unwrap(),
                "data: a\n\ndata: b\n\n",
                "{event:?}"
            );
        }
        // Broken ones pass.
        for event in [
            "data:  { \"choices\" :\t[ \r\n\n",
            "data: {\"choices\":[],\"usage\":{\"total_tokens\":1},\"choices\":[1]}",
            r#"data: [[],{"usage":{},"choices":[]}]"#,
            // Keys spelt with escapes are not looked for (no backend writes them).
            r#"data: {"ch\u006fices":[],"usage":{}}"#,
            r#"data: {"choices":[],"us\u0061ge":{}}"#,
        ] {
            let input = format!("{event}\n\n");
            assert_eq!(run(&[input.as_bytes()]), input.as_bytes(), "{event:?}");
        }
    }

    #[test]
    fn whole_events_pass_without_copying() {
        let stream = join(&events(false), "\n");
        let mut f = UsageChunkFilter::new();
        // Chunks of whole events: the same bytes come back.
        for chunk in [stream.clone(), join(&events(false)[..2], "\r\n")] {
            let chunk = Bytes::from(chunk);
            let out = f.feed(chunk.clone());
            assert_eq!(out.as_ptr(), chunk.as_ptr());
            assert_eq!(out.len(), chunk.len());
        }
        // A partial event at the end: the whole events before it come back as a slice.
        let chunk = Bytes::from(format!("{stream}data: {{\"partial"));
        let out = f.feed(chunk.clone());
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert_eq!(&out[..], stream.as_bytes());
        let out = f.feed(Bytes::from_static(b"\":1}\n\n"));
        assert_eq!(&out[..], b"data: {\"partial\":1}\n\n");
        // And the next whole events are returned as they are again.
        let chunk = Bytes::from(stream.clone());
        assert_eq!(f.feed(chunk.clone()).as_ptr(), chunk.as_ptr());
        assert!(f.finish().is_empty());
        // Empty chunks give nothing.
        assert!(f.feed(Bytes::new()).is_empty());
    }

    #[test]
    fn held_events_come_out_whole() {
        let mut f = UsageChunkFilter::new();
        assert!(f.feed(Bytes::from_static(b"data: {\"choi")).is_empty());
        assert!(f.feed(Bytes::from_static(b"ces\":[]")).is_empty());
        assert!(f.feed(Bytes::from_static(b",\"usage\":{}}\n")).is_empty());
        // Removed, and the event after it passes whole.
        let out = f.feed(Bytes::from_static(b"\ndata: [DONE]\n\ndata: x\n"));
        assert_eq!(&out[..], b"data: [DONE]\n\n");
        let out = f.feed(Bytes::from_static(b"\ndata: y\n\n"));
        assert_eq!(&out[..], b"data: x\n\ndata: y\n\n");
        // At the end: a held usage chunk is dropped, anything else returned.
        f.feed(Bytes::from_static(b"data: {\"choices\":[],\"usage\":{}}\n"));
        assert!(f.finish().is_empty());
        f.feed(Bytes::from_static(b"data: partial"));
        assert_eq!(&f.finish()[..], b"data: partial");
        f.feed(Bytes::from_static(b"data: x\n\r"));
        assert_eq!(&f.finish()[..], b"");
        assert_eq!(
            &f.feed(Bytes::from_static(b"\ndata: z\n\n"))[..],
            b"\ndata: z\n\n"
        );
    }

    /// A usage chunk of exactly `len` bytes, blank line included.
    fn padded_usage_chunk(len: usize) -> Vec<u8> {
        let head = br#"data: {"choices":[],"usage":{"total_tokens":1},"pad":""#;
        let tail = b"\"}\n\n";
        let mut v = head.to_vec();
        v.resize(len - tail.len(), b'p');
        v.extend_from_slice(tail);
        assert_eq!(v.len(), len);
        v
    }

    #[test]
    fn events_over_the_cap_pass_unfiltered() {
        for split in [None, Some(1), Some(4096), Some(MAX_HELD_BYTES)] {
            let feed_all = |input: &[u8]| {
                let mut f = UsageChunkFilter::new();
                let mut out = Vec::new();
                let pieces: Vec<&[u8]> = match split {
                    None => vec![input],
                    Some(n) if n < 100 => vec![&input[..n], &input[n..]],
                    Some(n) => input.chunks(n).collect(),
                };
                for p in pieces {
                    out.extend_from_slice(&f.feed(Bytes::copy_from_slice(p)));
                    assert!(f.held.len() <= MAX_HELD_BYTES, "{split:?}");
                }
                out.extend_from_slice(&f.finish());
                out
            };
            let at_cap = padded_usage_chunk(MAX_HELD_BYTES);
            let mut input = at_cap.clone();
            input.extend_from_slice(b"data: [DONE]\n\n");
            assert_eq!(feed_all(&input), b"data: [DONE]\n\n", "{split:?}");
            let over = padded_usage_chunk(MAX_HELD_BYTES + 1);
            let mut input = over.clone();
            input.extend_from_slice(&at_cap);
            input.extend_from_slice(b"data: [DONE]\n\n");
            let mut expected = over.clone();
            expected.extend_from_slice(b"data: [DONE]\n\n");
            assert_eq!(feed_all(&input), expected, "{split:?}");
        }
    }

    #[test]
    fn large_usage_chunks_under_a_mebibyte_are_removed() {
        for len in [100_000, 1_000_000] {
            let mut input = padded_usage_chunk(len);
            input.extend_from_slice(b"data: [DONE]\n\n");
            for size in [len, 4096, 777] {
                let pieces: Vec<&[u8]> = input.chunks(size).collect();
                assert_eq!(run(&pieces), b"data: [DONE]\n\n", "{len} in {size}s");
            }
        }
        assert_eq!(MAX_HELD_BYTES, 1 << 20);
    }

    #[test]
    fn an_event_over_the_cap_goes_out_as_it_comes() {
        let mut f = UsageChunkFilter::new();
        let half = vec![b'x'; MAX_HELD_BYTES / 2];
        assert!(
            f.feed(Bytes::from_static(
                b"data: {\"choices\":[],\"usage\":{},\"p\":\""
            ))
            .is_empty()
        );
        assert!(f.feed(Bytes::from(half.clone())).is_empty());
        // Exactly at the cap: still held.
        let mut g = UsageChunkFilter::new();
        assert!(g.feed(Bytes::from(vec![b'd'; MAX_HELD_BYTES])).is_empty());
        assert_eq!(g.held.len(), MAX_HELD_BYTES);
        assert_eq!(
            g.feed(Bytes::from_static(b"\n\n")).len(),
            MAX_HELD_BYTES + 2
        );
        // Past the cap: what was held and this chunk go out at once.
        let out = f.feed(Bytes::from(half.clone()));
        assert_eq!(out.len(), 36 + MAX_HELD_BYTES);
        assert_eq!(f.held.capacity(), 0);
        // The rest of that event too, without being held.
        let chunk = Bytes::from(half.clone());
        assert_eq!(f.feed(chunk.clone()).as_ptr(), chunk.as_ptr());
        assert_eq!(
            &f.feed(Bytes::from_static(b"\"}\n\ndata: a"))[..],
            b"\"}\n\n"
        );
        // The next event is filtered again.
        assert!(
            f.feed(Bytes::from_static(
                b"\n\ndata: {\"choices\":[],\"usage\":{}}\n\n"
            ))
            .len()
                == 9
        );
        assert!(f.finish().is_empty());
    }

    #[test]
    fn debug_shows_no_content() {
        let mut f = UsageChunkFilter::new();
        f.feed(Bytes::from_static(b"data: secret"));
        let dbg = format!("{f:?}");
        assert!(
            !dbg.contains("secret") && dbg.contains("held_bytes: 12"),
            "{dbg}"
        );
    }

    #[test]
    fn member_pre_check() {
        assert!(member_starts(br#"{"a" : [ ] }"#, b"\"a\"", b"[]"));
        assert!(member_starts(br#"{"a":1,"a":[]}"#, b"\"a\"", b"[]"));
        assert!(!member_starts(br#"{"a":[1]}"#, b"\"a\"", b"[]"));
        assert!(!member_starts(br#"{"a" [] }"#, b"\"a\"", b"[]"));
        assert!(!member_starts(br#"{"a":"#, b"\"a\"", b"[]"));
        assert!(!member_starts(br#"{"a":["#, b"\"a\"", b"[]"));
        assert!(!member_starts(br#"{"b":[]}"#, b"\"a\"", b"[]"));
    }
}
