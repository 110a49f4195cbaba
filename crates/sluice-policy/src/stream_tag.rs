//! `x-ms-stream`: decided from the request body's top-level `stream` field,
//! as APIM's streaming lab policy does.
//!
//! APIM evaluates `content["stream"].ToString()` and compares it to "true"
//! ignoring case, then writes the .NET boolean, so the header is `True` or
//! `False` (capitalised). A JSON `true`, or a string equal to "true" in any
//! case, count as true; anything else — the field missing, `null`, `false`, a
//! number, an object, or a body that is not a JSON object — is false. The key
//! itself is matched exactly (after unescaping), as JObject's indexer and
//! Azure OpenAI match it: `"Stream"` is another field. When the key appears
//! twice the last one wins, as with Newtonsoft's JObject.
//!
//! [`StreamProbe`] finds the field in one pass over the bytes, fed in chunks
//! as they stream past, holding O(1) state: no copy of the body, no tree, no
//! re-serialisation. Inside strings it skips ahead with `memchr`.

/// The header value for a flag.
pub fn header_value(stream: bool) -> &'static str {
    if stream { "True" } else { "False" }
}

/// The flag for a whole body.
pub fn stream_flag(body: &[u8]) -> bool {
    // A body that spells `stream` nowhere and holds no `\u` escape (which
    // could spell it) has no `stream` key: no need to walk it byte by byte.
    if !may_hold_stream(body) {
        return false;
    }
    let mut p = StreamProbe::default();
    p.feed(body);
    p.finish()
}

/// Whether the raw JSON value `value` (a whole body's top-level `stream`,
/// already checked) makes a stream: `true`, or a string equal to "true"
/// ignoring case once unescaped.
pub(crate) fn value_is_true(value: &[u8]) -> bool {
    match value {
        b"true" => true,
        [b'"', text @ .., b'"'] if !text.contains(&b'\\') => text.eq_ignore_ascii_case(b"true"),
        [b'"', ..] => {
            serde_json::from_slice::<String>(value).is_ok_and(|s| s.eq_ignore_ascii_case("true"))
        }
        _ => false,
    }
}

/// Which of the top-level keys the gateway reads before routing a JSON body
/// may be in it, as [`key_hints`] finds out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyHints {
    /// `"stream` appears (the key `stream`, or `stream_options`).
    pub stream: bool,
    /// `"store"` appears.
    pub store: bool,
}

/// Which of the keys `stream` and `store` `body` may hold, in one search: a
/// key is a JSON string, so the name appears right after a quote, unless a
/// `\u` escape spells it (then both may be there). A `false` is sure; a
/// `true` only says the body is worth a walk.
pub(crate) fn key_hints(body: &[u8]) -> KeyHints {
    static QUOTED_ST: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"st"));
    let mut hints = KeyHints {
        stream: false,
        store: false,
    };
    for at in QUOTED_ST.find_iter(body) {
        let after = &body[at + 3..];
        hints.stream |= after.starts_with(b"ream");
        hints.store |= after.starts_with(b"ore\"");
        if hints.stream && hints.store {
            return hints;
        }
    }
    if has_unicode_escape(body) {
        return KeyHints {
            stream: true,
            store: true,
        };
    }
    hints
}

/// A `\u` escape appears in `body` (it could spell any key).
fn has_unicode_escape(body: &[u8]) -> bool {
    memchr::memchr_iter(b'\\', body).any(|i| body.get(i + 1) == Some(&b'u'))
}

/// `stream` appears somewhere in `body`, or a `\u` escape (which could spell
/// it) does. Both searches skip through the bytes many at a time.
pub(crate) fn may_hold_stream(body: &[u8]) -> bool {
    static STREAM: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"stream"));
    STREAM.find(body).is_some() || has_unicode_escape(body)
}

/// Where the scanner is in the JSON text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Before the top-level value.
    #[default]
    Start,
    /// Inside the top-level object, expecting a key (or `}`).
    Key,
    /// After a top-level key, expecting `:`.
    Colon,
    /// After `:`, expecting the top-level value.
    Value,
    /// Inside a nested value (depth > 1) or a top-level scalar; see `depth`.
    Skip,
    /// After a top-level value, expecting `,` or `}`.
    Comma,
    /// The top-level object closed.
    Done,
    /// Not a JSON object we understand: the answer is false.
    Invalid,
}

/// What the string being read is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrRole {
    /// A top-level key: compared with `stream`.
    Key,
    /// The value of a top-level `stream` key: compared with "true".
    StreamValue,
    /// Anything else: skipped.
    Other,
}

/// An incremental scanner for the top-level `stream` field of a JSON object.
#[derive(Debug, Clone, Default)]
pub struct StreamProbe {
    state: State,
    /// Nesting depth of the value being skipped (Skip state).
    depth: u32,
    in_string: Option<StrRole>,
    escaped: bool,
    /// Up to 8 bytes of the current key (as sent) or stream value
    /// (lowercased);
    /// `cap_len` > 8 means "longer than anything we compare with".
    cap: [u8; 8],
    cap_len: usize,
    /// The current top-level key is `stream`.
    key_is_stream: bool,
    /// Pending `\uXXXX` escape digits still to read (0 when none).
    unicode_left: u8,
    unicode_val: u32,
    /// A literal (`true`, numbers...) being read as the stream value.
    literal: bool,
    /// The answer so far (the last `stream` key wins).
    result: bool,
}

impl StreamProbe {
    /// Scan the next chunk of the body.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if matches!(self.state, State::Invalid | State::Done) {
                if self.state == State::Done && chunk.iter().any(|b| !b.is_ascii_whitespace()) {
                    self.state = State::Invalid;
                }
                return;
            }
            if self.in_string.is_some() {
                let used = self.string_bytes(chunk);
                chunk = &chunk[used..];
                continue;
            }
            let b = chunk[0];
            chunk = &chunk[1..];
            self.byte(b);
        }
    }

    /// The flag once the body has ended.
    pub fn finish(&mut self) -> bool {
        if self.literal {
            self.end_literal();
        }
        self.state == State::Done && self.result
    }

    /// Keep a byte of a key (exactly) or of the stream value (lowercased:
    /// "true" is compared ignoring case).
    fn capture(&mut self, role: StrRole, b: u8) {
        self.capture_raw(if role == StrRole::Key {
            b
        } else {
            b.to_ascii_lowercase()
        });
    }

    fn capture_raw(&mut self, b: u8) {
        if self.cap_len < self.cap.len() {
            self.cap[self.cap_len] = b;
        }
        self.cap_len = self.cap_len.saturating_add(1);
    }

    /// The captured bytes, if they fit (longer texts never match).
    fn captured(&self) -> Option<&[u8]> {
        self.cap.get(..self.cap_len)
    }

    /// Consume string content; returns how many bytes were used.
    fn string_bytes(&mut self, chunk: &[u8]) -> usize {
        let role = self.in_string.unwrap_or(StrRole::Other);
        let mut i = 0;
        while i < chunk.len() {
            if self.unicode_left > 0 {
                let d = match (chunk[i] as char).to_digit(16) {
                    Some(d) => d,
                    None => {
                        self.state = State::Invalid;
                        return chunk.len();
                    }
                };
                self.unicode_val = self.unicode_val * 16 + d;
                self.unicode_left -= 1;
                if self.unicode_left == 0 && role != StrRole::Other {
                    match u8::try_from(self.unicode_val) {
                        Ok(c) if c.is_ascii() => self.capture(role, c),
                        _ => self.cap_len = usize::MAX,
                    }
                }
                i += 1;
                continue;
            }
            if self.escaped {
                self.escaped = false;
                let c = chunk[i];
                let real = match c {
                    b'u' => {
                        self.unicode_left = 4;
                        self.unicode_val = 0;
                        i += 1;
                        continue;
                    }
                    b'n' => b'\n',
                    b't' => b'\t',
                    b'r' => b'\r',
                    b'b' => 8,
                    b'f' => 12,
                    b'"' | b'\\' | b'/' => c,
                    // Not a JSON escape: not a body this reads.
                    _ => {
                        self.state = State::Invalid;
                        return chunk.len();
                    }
                };
                if role != StrRole::Other {
                    self.capture(role, real);
                }
                i += 1;
                continue;
            }
            if role == StrRole::Other {
                // Fast path: jump to the next quote or backslash.
                match memchr::memchr2(b'"', b'\\', &chunk[i..]) {
                    Some(off) => i += off,
                    None => return chunk.len(),
                }
            }
            match chunk[i] {
                b'"' => {
                    self.end_string(role);
                    return i + 1;
                }
                b'\\' => self.escaped = true,
                c => {
                    if role != StrRole::Other {
                        self.capture(role, c);
                    }
                }
            }
            i += 1;
        }
        chunk.len()
    }

    fn start_string(&mut self, role: StrRole) {
        self.in_string = Some(role);
        self.cap_len = 0;
        self.escaped = false;
        self.unicode_left = 0;
    }

    fn end_string(&mut self, role: StrRole) {
        self.in_string = None;
        match role {
            StrRole::Key => {
                self.key_is_stream = self.captured() == Some(b"stream");
                self.state = State::Colon;
            }
            StrRole::StreamValue => {
                self.result = self.captured() == Some(b"true");
                self.state = State::Comma;
            }
            StrRole::Other => {
                if self.state == State::Value {
                    self.state = State::Comma;
                }
            }
        }
    }

    /// A top-level literal ended: `true`, `false`, `null` or a number.
    fn end_literal(&mut self) {
        self.literal = false;
        let text = self.captured();
        let number = self.cap[0] == b'-' || self.cap[0].is_ascii_digit();
        if !number && !matches!(text, Some(b"true" | b"false" | b"null")) {
            self.state = State::Invalid;
            return;
        }
        if self.key_is_stream {
            self.result = text == Some(b"true");
        }
        self.state = State::Comma;
    }

    fn byte(&mut self, b: u8) {
        if self.literal {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-') {
                self.capture_raw(b);
                return;
            }
            self.end_literal();
        }
        if b.is_ascii_whitespace() {
            return;
        }
        match self.state {
            State::Start => {
                self.state = if b == b'{' {
                    State::Key
                } else {
                    State::Invalid
                };
            }
            State::Key => match b {
                b'"' => self.start_string(StrRole::Key),
                b'}' => self.state = State::Done,
                _ => self.state = State::Invalid,
            },
            State::Colon => {
                self.state = if b == b':' {
                    State::Value
                } else {
                    State::Invalid
                };
            }
            State::Value => match b {
                b'"' if self.key_is_stream => self.start_string(StrRole::StreamValue),
                b'"' => self.start_string(StrRole::Other),
                b'{' | b'[' => {
                    if self.key_is_stream {
                        self.result = false;
                    }
                    self.depth = 1;
                    self.state = State::Skip;
                }
                c if c.is_ascii_alphanumeric() || c == b'-' => {
                    // Literals keep their case: `True` is not JSON.
                    self.literal = true;
                    self.cap_len = 0;
                    self.capture_raw(c);
                }
                _ => self.state = State::Invalid,
            },
            State::Skip => match b {
                b'"' => self.start_string(StrRole::Other),
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        self.state = State::Comma;
                    }
                }
                _ => {}
            },
            State::Comma => match b {
                b',' => self.state = State::Key,
                b'}' => self.state = State::Done,
                _ => self.state = State::Invalid,
            },
            State::Done | State::Invalid => self.state = State::Invalid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decides_like_apim() {
        assert!(stream_flag(br#"{"stream":true,"messages":[]}"#));
        assert!(stream_flag(
            br#"{"messages":[{"content":"x"}], "stream" : true}"#
        ));
        assert!(stream_flag(br#"{"stream":"TRUE"}"#));
        for may in [
            &b"stream"[..],
            b"x:stream",
            b"sstream",
            b"\\u0073",
            b"a\\\\u",
            b"\\\\\\u",
        ] {
            assert!(may_hold_stream(may), "{:?}", String::from_utf8_lossy(may));
        }
        for not in [
            &b"strea"[..],
            b"s tream",
            b"",
            b"\\n\\",
            b"\\",
            b"stREA",
            b"STREAM",
            b"Stream",
        ] {
            assert!(!may_hold_stream(not), "{:?}", String::from_utf8_lossy(not));
        }
        for (body, stream, store) in [
            (&br#"{"stream":true}"#[..], true, false),
            (br#"{"stream_options":{}}"#, true, false),
            (br#"{"store":true}"#, false, true),
            (br#"{"store":1,"stream":2}"#, true, true),
            (br#"{"st\u006fre":true}"#, true, true),
            (br#"{"storex":1,"streak":2,"x":"a stream"}"#, false, false),
            // A value spelled so is only worth a walk.
            (br#"{"x":"stream"}"#, true, false),
            (
                br#"{"messages":[{"content":"a stream store"}]}"#,
                false,
                false,
            ),
            (br#"{"messages":[{"content":"a \"store\""}]}"#, false, false),
            (br#""st"#, false, false),
            (b"", false, false),
        ] {
            assert_eq!(
                key_hints(body),
                KeyHints { stream, store },
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        // The key is matched exactly, as JObject's indexer and Azure
        // OpenAI match it; only the value "true" ignores case.
        assert!(!stream_flag(br#"{"STREAM":true}"#));
        assert!(!stream_flag(br#"{"sTrEaM":true}"#));
        assert!(!stream_flag(br#"{"stream":false,"Stream":true}"#));
        assert!(!stream_flag(br#"{"\u0053tream":true}"#));
        assert!(stream_flag(br#"{"Stream":false,"stream":true}"#));
        // An escape JSON does not have makes the body invalid, wherever it
        // is, whole or fed in parts.
        for body in [
            &br#"{"str\eam":true}"#[..],
            br#"{"stream":true,"x":"\q"}"#,
            br#"{"stream":"tr\ue"}"#,
        ] {
            assert!(!stream_flag(body), "{}", String::from_utf8_lossy(body));
            let mut p = StreamProbe::default();
            p.feed(body);
            assert!(!p.finish(), "{}", String::from_utf8_lossy(body));
        }
        // Every short escape JSON has is read, as what it stands for.
        assert!(stream_flag(br#"{"x":"\t\b\f\n\r\/\"\\","stream":true}"#));
        assert!(!stream_flag(br#"{"stream\n":true}"#));
        assert!(!stream_flag(br#"{"stream":"true\t"}"#));
        // Keys longer than the probe keeps are told apart too.
        assert!(stream_flag(
            br#"{"stream_options":{"include_usage":true},"stream":true}"#
        ));
        assert!(!stream_flag(br#"{"stream":false,"streamstream":true}"#));
        assert!(stream_flag(br#"{"\u0073tream":true}"#));
        assert!(!stream_flag(
            br#"{"messages":[{"content":"s"}],"strea":true}"#
        ));
        assert!(stream_flag(br#"{"stream":"tr\u0075e"}"#));
        assert!(stream_flag(br#"{"str\u0065am":true}"#));
        assert!(stream_flag(b" {\n\t\"stream\"\n:\ntrue\n}\n"));
        assert!(!stream_flag(br#"{"stream":false}"#));
        assert!(!stream_flag(br#"{"stream":null}"#));
        assert!(!stream_flag(br#"{"stream":1}"#));
        assert!(!stream_flag(br#"{"stream":True}"#));
        assert!(!stream_flag(br#"{"stream":tRUE}"#));
        assert!(!stream_flag(br#"{"a":xyz,"stream":true}"#), "not JSON");
        assert!(!stream_flag(br#"{"stream":"true "}"#));
        assert!(!stream_flag(br#"{"stream":"truely"}"#));
        assert!(!stream_flag(br#"{"stream":{"a":true}}"#));
        assert!(!stream_flag(br#"{"stream":[true]}"#));
        assert!(!stream_flag(br#"{"streams":true}"#));
        assert!(!stream_flag(br#"{"messages":[{"stream":true}]}"#));
        assert!(!stream_flag(br#"{"prompt":"\"stream\": true"}"#));
        assert!(!stream_flag(br#"{"prompt":"\\","stream":false}"#));
        assert!(stream_flag(br#"{"prompt":"\\","stream":true}"#));
        assert!(!stream_flag(b"not json \"stream\""));
        assert!(!stream_flag(b"[{\"stream\":true}]"));
        assert!(!stream_flag(br#"{"stream":true"#), "truncated");
        assert!(!stream_flag(br#"{"stream":true}x"#), "trailing garbage");
        assert!(!stream_flag(b""));
        assert!(stream_flag(br#"{"a":{"b":[1,{"c":"}"}]},"stream":true}"#));
    }

    #[test]
    fn the_last_duplicate_key_wins() {
        assert!(stream_flag(br#"{"stream":false,"stream":true}"#));
        assert!(!stream_flag(br#"{"stream":true,"stream":false}"#));
    }

    #[test]
    fn chunk_boundaries_do_not_matter() {
        let bodies: [&[u8]; 4] = [
            br#"{"messages":[{"role":"user","content":"a \"quoted\" \\ text \u00e9"}],"stream":true}"#,
            br#"{"stream":"tr\u0075e","x":[[],{}]}"#,
            br#"{"stream": false , "y":"stream"}"#,
            br#"{"x":"\\\"","stream":true}"#,
        ];
        for body in bodies {
            let whole = stream_flag(body);
            for split in 0..body.len() {
                let mut p = StreamProbe::default();
                p.feed(&body[..split]);
                p.feed(&body[split..]);
                assert_eq!(
                    p.finish(),
                    whole,
                    "split at {split} of {}",
                    String::from_utf8_lossy(body)
                );
            }
            let mut p = StreamProbe::default();
            for b in body {
                p.feed(std::slice::from_ref(b));
            }
            assert_eq!(p.finish(), whole);
        }
    }

    #[test]
    fn agrees_with_a_json_parser_on_valid_objects() {
        let cases = [
            r#"{"stream":true}"#,
            r#"{"stream":"True"}"#,
            r#"{"a":1,"stream":false}"#,
            r#"{"a":[1,2,{"stream":true}],"b":"x"}"#,
            r#"{"stream":0}"#,
            r#"{"n":-1.5e3,"stream":true,"z":null}"#,
        ];
        for c in cases {
            let v: serde_json::Value = serde_json::from_str(c).unwrap();
            let want = match &v["stream"] {
                serde_json::Value::Bool(b) => *b,
                serde_json::Value::String(s) => s.eq_ignore_ascii_case("true"),
                _ => false,
            };
            assert_eq!(stream_flag(c.as_bytes()), want, "{c}");
        }
    }

    #[test]
    fn header_values_are_capitalised() {
        assert_eq!(header_value(true), "True");
        assert_eq!(header_value(false), "False");
    }
}
