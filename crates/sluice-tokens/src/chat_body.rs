//! A chat completions body read for its estimate in one pass, without a
//! `serde_json::Value` tree.
//!
//! Building the tree cost more than counting once counts were remembered
//! (`memo`): every key, string and message became an allocation. This reader
//! walks the body with serde's visitors and keeps, for each message field,
//! only what the estimate needs: the text to count (borrowed from the body
//! unless it holds escapes), a fixed cost, or, for the rare field that is
//! counted by its JSON text (`tool_calls`, `function_call`, a `content`
//! object), that value. Everything else is skipped while being checked, so a
//! body that is not valid JSON gets no estimate, as before.
//!
//! It reads exactly what the tree-based reading did (tests compare the two):
//! a key given twice counts once, with its last value (`serde_json::Map`
//! keeps the last); a `messages` that is not an array, or a message that is
//! not an object, counts nothing.
//!
//! The visitors are themselves the slow part for the bodies every request
//! carries, so a hand-written walk ([`fast`], over the shared
//! [`Reader`](crate::json_walk::Reader)) reads the body first and leaves to
//! them only what it is not sure of: a key with an escape or a byte outside
//! ASCII, nesting past 64, and any malformed JSON. The rarer values it keeps
//! are handed to serde from their own bytes, so they never differ: values
//! kept whole (`tools`, a `content` object...), strings with a `\u` escape,
//! and numbers with an exponent (whose range serde checks).

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{
    DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
    value::{MapAccessDeserializer, SeqAccessDeserializer},
};
use serde_json::Value;

/// The `visit_*` methods of the scalars a visitor answers alike: booleans,
/// numbers and `null` (and strings, with `str`) are `$v`.
macro_rules! scalars_are {
    ($v:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($v)
        }
    };
    ($v:expr, str) => {
        scalars_are!($v);
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($v)
        }
    };
}

/// What one message field, or one `content` part, costs.
#[derive(Debug)]
pub(crate) enum Cost<'a> {
    /// Nothing (`null`, a boolean, a number, a part that is neither a string
    /// nor an object).
    Zero,
    /// The tokens of this text.
    Text(Cow<'a, str>),
    /// A fixed number of tokens (an image part).
    Fixed(u64),
    /// The tokens of this value's compact JSON text.
    Json(Value),
    /// A `content` list: the sum of its parts.
    Parts(Vec<Cost<'a>>),
}

/// One message: its fields by name (a repeated name keeps its last value).
pub(crate) type Message<'a> = Vec<(Cow<'a, str>, Cost<'a>)>;

/// What the estimate reads of a chat body.
#[derive(Debug, Default)]
pub(crate) struct ChatBody<'a> {
    /// `messages`, when it is an array (non-object entries are left out).
    pub messages: Option<Vec<Message<'a>>>,
    /// `tools` and `functions`, when present (counted if array or object).
    pub tools: Option<Value>,
    pub functions: Option<Value>,
    pub model: Option<Value>,
    pub max_completion_tokens: Option<Value>,
    pub max_tokens: Option<Value>,
    pub max_output_tokens: Option<Value>,
    pub n: Option<Value>,
    pub stream_options: Option<Value>,
}

impl<'a> ChatBody<'a> {
    /// `None` when `body` is not one valid JSON object.
    pub(crate) fn read(body: &'a [u8]) -> Option<Self> {
        fast::read(body).or_else(|| Self::read_with_serde(body))
    }

    /// The same reading with serde's visitors (every shape).
    pub(crate) fn read_with_serde(body: &'a [u8]) -> Option<Self> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let parsed = de.deserialize_any(BodyVisitor).ok()?;
        de.end().ok()?;
        parsed
    }
}

/// A string, borrowed from the body when it has no escapes.
struct CowStr<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The top level: anything but an object gives `None`.
struct BodyVisitor;

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = Option<ChatBody<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut body = ChatBody::default();
        while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
            match &*key {
                "messages" => body.messages = map.next_value_seed(MessagesSeed)?,
                "tools" => body.tools = Some(map.next_value()?),
                "functions" => body.functions = Some(map.next_value()?),
                "model" => body.model = Some(map.next_value()?),
                "max_completion_tokens" => body.max_completion_tokens = Some(map.next_value()?),
                "max_tokens" => body.max_tokens = Some(map.next_value()?),
                "max_output_tokens" => body.max_output_tokens = Some(map.next_value()?),
                "n" => body.n = Some(map.next_value()?),
                "stream_options" => body.stream_options = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(body))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    scalars_are!(None, str);
}

/// `messages`: an array of messages, else nothing.
struct MessagesSeed;

impl<'de> DeserializeSeed<'de> for MessagesSeed {
    type Value = Option<Vec<Message<'de>>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(MessagesVisitor)
    }
}

struct MessagesVisitor;

impl<'de> Visitor<'de> for MessagesVisitor {
    type Value = Option<Vec<Message<'de>>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut messages = Vec::with_capacity(seq.size_hint().unwrap_or(4));
        while let Some(m) = seq.next_element_seed(MessageSeed)? {
            if let Some(m) = m {
                messages.push(m);
            }
        }
        Ok(Some(messages))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    scalars_are!(None, str);
}

/// One entry of `messages`: an object's fields, else nothing.
struct MessageSeed;

impl<'de> DeserializeSeed<'de> for MessageSeed {
    type Value = Option<Message<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(MessageVisitor)
    }
}

struct MessageVisitor;

impl<'de> Visitor<'de> for MessageVisitor {
    type Value = Option<Message<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields: Message<'de> = Vec::with_capacity(map.size_hint().unwrap_or(3));
        while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
            let at = if key == "content" {
                At::Content
            } else {
                At::Field
            };
            let cost = map.next_value_seed(FieldSeed { at })?;
            match fields.iter_mut().find(|(k, _)| *k == key) {
                Some(field) => field.1 = cost,
                None => fields.push((key, cost)),
            }
        }
        Ok(Some(fields))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    scalars_are!(None, str);
}

/// Where a value stands, which decides what its arrays and objects cost.
#[derive(Clone, Copy, PartialEq, Eq)]
enum At {
    /// A message field: an array or object costs its JSON text.
    Field,
    /// A message's `content`: an array is a list of parts.
    Content,
    /// One of those parts: an object is read by its `type`, an array is
    /// nothing.
    Part,
}

/// A message field's value, a `content` list, or one part of it.
struct FieldSeed {
    at: At,
}

impl<'de> DeserializeSeed<'de> for FieldSeed {
    type Value = Cost<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FieldSeed {
    type Value = Cost<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cost::Text(Cow::Borrowed(v)))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cost::Text(Cow::Owned(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cost::Text(Cow::Owned(v.to_owned())))
    }
    scalars_are!(Cost::Zero);

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        match self.at {
            At::Field => Value::deserialize(SeqAccessDeserializer::new(seq)).map(Cost::Json),
            At::Content => {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(2));
                while let Some(part) = seq.next_element_seed(FieldSeed { at: At::Part })? {
                    parts.push(part);
                }
                Ok(Cost::Parts(parts))
            }
            At::Part => {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Cost::Zero)
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        if self.at != At::Part {
            return Value::deserialize(MapAccessDeserializer::new(map)).map(Cost::Json);
        }
        // A part: the last of each key wins; only strings count.
        let (mut kind, mut text, mut refusal) = (None, None, None);
        while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
            let slot = match &*key {
                "type" => &mut kind,
                "text" => &mut text,
                "refusal" => &mut refusal,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = match map.next_value_seed(FieldSeed { at: At::Field })? {
                Cost::Text(s) => Some(s),
                _ => None,
            };
        }
        Ok(match kind.as_deref().unwrap_or("") {
            "image_url" | "image" | "input_image" => Cost::Fixed(crate::estimate::IMAGE_TOKENS),
            "refusal" => refusal.map_or(Cost::Zero, Cost::Text),
            _ => text.map_or(Cost::Zero, Cost::Text),
        })
    }
}

/// The hand-written reading of the usual bodies.
mod fast {
    use std::borrow::Cow;

    use serde_json::Value;

    use super::{ChatBody, Cost, Message};
    use crate::json_walk::{Reader, unescape};

    /// The body read exactly as the visitors read it, or `None` when the
    /// walk leaves it to them (which includes every body that is not a valid
    /// JSON object).
    pub(super) fn read(body: &[u8]) -> Option<ChatBody<'_>> {
        let mut r = Reader::new(body);
        let mut out = ChatBody::default();
        r.object(|r, key| {
            match key {
                b"messages" => out.messages = r.messages()?,
                b"tools" => out.tools = Some(r.value()?),
                b"functions" => out.functions = Some(r.value()?),
                b"model" => out.model = Some(r.value()?),
                b"max_completion_tokens" => out.max_completion_tokens = Some(r.value()?),
                b"max_tokens" => out.max_tokens = Some(r.value()?),
                b"max_output_tokens" => out.max_output_tokens = Some(r.value()?),
                b"n" => out.n = Some(r.value()?),
                b"stream_options" => out.stream_options = Some(r.value()?),
                _ => r.skip()?,
            }
            Some(())
        })?;
        r.at_end().then_some(out)
    }

    impl<'a> Reader<'a> {
        /// A string serde would hand to a visitor: valid UTF-8, borrowed
        /// unless it holds escapes. One with a `\\u` escape is unescaped by
        /// serde itself, from its own bytes (which checks surrogates).
        fn kept_str(&mut self) -> Option<Cow<'a, str>> {
            let start = self.i;
            let (raw, escaped) = self.string()?;
            let raw = std::str::from_utf8(raw).ok()?;
            if !escaped {
                return Some(Cow::Borrowed(raw));
            }
            Some(Cow::Owned(match unescape(raw) {
                Some(s) => s,
                None => serde_json::from_slice(&self.b[start..self.i]).ok()?,
            }))
        }

        /// A number serde would hand to a visitor, which it refuses when it
        /// is out of `f64`'s range: one without an exponent and with at most
        /// 300 digits never is; any other is parsed by serde to know.
        fn kept_number(&mut self) -> Option<()> {
            let start = self.i;
            self.number()?;
            let n = &self.b[start..self.i];
            if n.len() <= 300 && !n.iter().any(|&c| c == b'e' || c == b'E') {
                return Some(());
            }
            serde_json::from_slice::<Value>(n).ok().map(drop)
        }

        /// A value a visitor is handed and answers nothing for: scalars are
        /// checked as serde checks what it visits; the members of an array
        /// or object are ignored (skipped).
        fn nothing(&mut self) -> Option<()> {
            match self.peek()? {
                b'"' => self.kept_str().map(drop),
                b'-' | b'0'..=b'9' => self.kept_number(),
                _ => self.skip(),
            }
        }

        /// A value kept as a `serde_json::Value`: the usual small ones built
        /// here, any other parsed by serde from its own (checked) bytes.
        fn value(&mut self) -> Option<Value> {
            match self.peek()? {
                b'"' => self.kept_str().map(|s| Value::String(s.into_owned())),
                b't' => self.literal(b"true").map(|()| Value::Bool(true)),
                b'f' => self.literal(b"false").map(|()| Value::Bool(false)),
                b'n' => self.literal(b"null").map(|()| Value::Null),
                _ => {
                    let start = self.i;
                    self.skip()?;
                    let raw = &self.b[start..self.i];
                    if raw.len() <= 18 && raw.iter().all(u8::is_ascii_digit) {
                        // `number` refused leading zeros: this is a u64.
                        let n = raw.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
                        return Some(Value::from(n));
                    }
                    serde_json::from_slice(raw).ok()
                }
            }
        }

        /// `messages`: an array's objects (its other entries left out), or
        /// `None` for anything else.
        fn messages(&mut self) -> Option<Option<Vec<Message<'a>>>> {
            if self.peek()? != b'[' {
                return self.nothing().map(|()| None);
            }
            let mut messages = Vec::with_capacity(4);
            self.array(|r| {
                if r.peek()? == b'{' {
                    messages.push(r.message()?);
                    Some(())
                } else {
                    r.nothing()
                }
            })?;
            Some(Some(messages))
        }

        /// One message's fields; a repeated name keeps its first place and
        /// its last value.
        fn message(&mut self) -> Option<Message<'a>> {
            let mut fields: Message<'a> = Vec::with_capacity(3);
            self.object(|r, key| {
                // `object` let through only ASCII keys without escapes.
                let key = std::str::from_utf8(key).ok()?;
                let cost = if key == "content" {
                    r.content()?
                } else {
                    r.field()?
                };
                match fields.iter_mut().find(|(k, _)| *k == key) {
                    Some(field) => field.1 = cost,
                    None => fields.push((Cow::Borrowed(key), cost)),
                }
                Some(())
            })?;
            Some(fields)
        }

        /// A message field: a string is text, an array or object its JSON
        /// text, anything else nothing.
        fn field(&mut self) -> Option<Cost<'a>> {
            match self.peek()? {
                b'"' => self.kept_str().map(Cost::Text),
                b'[' | b'{' => self.value().map(Cost::Json),
                _ => self.nothing().map(|()| Cost::Zero),
            }
        }

        /// A message's `content`: as a field, but an array is a list of
        /// parts.
        fn content(&mut self) -> Option<Cost<'a>> {
            if self.peek()? != b'[' {
                return self.field();
            }
            let mut parts = Vec::with_capacity(2);
            self.array(|r| {
                parts.push(r.part()?);
                Some(())
            })?;
            Some(Cost::Parts(parts))
        }

        /// One `content` part: a string is text, an object is read by its
        /// `type` (the last of each key wins; only strings count), anything
        /// else is nothing.
        fn part(&mut self) -> Option<Cost<'a>> {
            match self.peek()? {
                b'"' => self.kept_str().map(Cost::Text),
                b'{' => {
                    let (mut kind, mut text, mut refusal) = (None, None, None);
                    self.object(|r, key| {
                        let slot = match key {
                            b"type" => &mut kind,
                            b"text" => &mut text,
                            b"refusal" => &mut refusal,
                            _ => return r.skip(),
                        };
                        *slot = match r.field()? {
                            Cost::Text(s) => Some(s),
                            _ => None,
                        };
                        Some(())
                    })?;
                    Some(match kind.as_deref().unwrap_or("") {
                        "image_url" | "image" | "input_image" => {
                            Cost::Fixed(crate::estimate::IMAGE_TOKENS)
                        }
                        "refusal" => refusal.map_or(Cost::Zero, Cost::Text),
                        _ => text.map_or(Cost::Zero, Cost::Text),
                    })
                }
                _ => self.nothing().map(|()| Cost::Zero),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::prelude::*;

    use super::*;
    use crate::json_walk::generate::{array_of, mutate, object_of, string, value, ws};

    /// Whether the walk answered for `body`; when it did, serde's visitors
    /// read the same.
    fn agrees(body: &[u8]) -> bool {
        let Some(walked) = fast::read(body) else {
            return false;
        };
        let visited = ChatBody::read_with_serde(body).unwrap_or_else(|| {
            panic!(
                "the walk read a body serde refuses: {}",
                String::from_utf8_lossy(body)
            )
        });
        assert_eq!(
            format!("{walked:?}"),
            format!("{visited:?}"),
            "{}",
            String::from_utf8_lossy(body)
        );
        true
    }

    #[test]
    fn the_usual_bodies_are_walked_and_read_as_serde_reads_them() {
        let bodies = [
            r#"{"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Hi"}],"max_tokens":16}"#,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Say \"hi\"\n\tthen stop\\ \/"}],"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"What is in this image?"},{"type":"image_url","image_url":{"url":"https://example.com/a.png","detail":"low"}},{"type":"input_image"},{"type":"refusal","refusal":"no"},{"type":"refusal","text":"x"},"plain",3,null,[1,2],{"text":"untyped"}]}]}"#,
            r#"{"messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},{"role":"tool","tool_call_id":"call_1","content":"22 C"}],"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}],"tool_choice":"auto"}"#,
            r#"{"messages":[{"role":"user","content":{"weird":[1,2.5,-3e2]}},{"role":"user","name":"bob","content":"a","content":"b"}],"functions":[{"name":"f"}],"n":2,"max_completion_tokens":100,"max_output_tokens":-1,"temperature":0.2e1}"#,
            "{\n  \"messages\" : [\n    { \"role\" : \"user\" , \"content\" : \"hi\" }\n  ] ,\n  \"max_tokens\" : 5\n}\n",
            r#"{"messages":"not a list","model":null,"n":1.5,"max_tokens":123456789012345678901234567890}"#,
            r#"{"messages":[1,"two",[3],null,true,{"role":"user","content":"x"}],"messages_x":[]}"#,
            r#"{"messages":[{"role":"user","content":"first"}],"messages":[{"role":"user","content":"second"}]}"#,
            r#"{"messages":{"role":"user"},"user":"\u00e9\ud83d\ude00","metadata":{"k":1e400}}"#,
            r#"{"messages":[{"role":"user","content":"caf\u00e9 is skipped? no"}]}"#,
            r#"{}"#,
            r#"{"messages":[]}"#,
            r#"{"messages":[{}]}"#,
            r#"{"model":"gpt-4o-mini","messages":[{"role":"developer","content":[{"type":"text","text":"Be brief."}]}],"max_tokens":0}"#,
        ];
        let mut walked = 0;
        for body in bodies {
            if agrees(body.as_bytes()) {
                walked += 1;
            }
        }
        assert_eq!(walked, bodies.len());
    }

    #[test]
    fn what_the_walk_does_not_handle_is_left_to_serde() {
        let nested = |depth: usize| {
            format!(
                r#"{{"messages":[],"x":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            )
        };
        for body in [
            // Keys with an escape or outside ASCII.
            r#"{"mess\u0061ges":[]}"#.to_string(),
            r#"{"messages":[{"r\"ole":"user"}]}"#.to_string(),
            r#"{"é":1}"#.to_string(),
            // What serde refuses in a value it visits (and not in one it
            // skips): a lone surrogate, a number out of range.
            r#"{"messages":[{"role":"user","content":"\ud800"}]}"#.to_string(),
            r#"{"model":"\ud800"}"#.to_string(),
            r#"{"messages":"\udc00"}"#.to_string(),
            r#"{"messages":[{"role":"user","weight":1e400}]}"#.to_string(),
            r#"{"n":-1e999}"#.to_string(),
            // Without an exponent, as many digits as overflow an f64.
            format!(
                r#"{{"messages":[{{"role":"user","weight":{}}}]}}"#,
                "9".repeat(400)
            ),
            // Deep nesting.
            nested(70),
            // Not one JSON object.
            r#"[{"messages":[]}]"#.to_string(),
            r#""messages""#.to_string(),
            r#"{"messages":[]} x"#.to_string(),
            r#"{"messages":[],}"#.to_string(),
            r#"{"messages":[{"role":"user","content":"a}]}"#.to_string(),
            "{\"messages\":[{\"content\":\"a\u{1}\"}]}".to_string(),
            String::new(),
        ] {
            assert!(fast::read(body.as_bytes()).is_none(), "{body}");
            // The whole reading is serde's.
            assert_eq!(
                format!("{:?}", ChatBody::read(body.as_bytes())),
                format!("{:?}", ChatBody::read_with_serde(body.as_bytes())),
                "{body}"
            );
        }
        assert!(agrees(nested(60).as_bytes()));
        // The same places with what serde accepts: serde reads those values
        // from their own bytes for the walk.
        for body in [
            r#"{"messages":[{"role":"user","content":"\u0041\ud83d\ude00"}]}"#,
            r#"{"model":"gpt\u002d4o","messages":"\u00e9"}"#,
            r#"{"messages":[{"role":"user","weight":1e300,"x":-2E-5}]}"#,
            r#"{"messages":[{"content":[{"type":"text","text":"a"},1e5]}]}"#,
            r#"{"messages":2E1,"user":"\ud800","seed":1e999}"#,
            &format!(
                r#"{{"messages":[{{"role":"user","weight":{}}}]}}"#,
                "9".repeat(300)
            ),
        ] {
            assert!(agrees(body.as_bytes()), "{body}");
        }
        // Invalid UTF-8 in a kept string, and in a skipped one (which serde
        // does not check either).
        assert!(fast::read(b"{\"model\":\"\xff\"}").is_none());
        assert!(ChatBody::read_with_serde(b"{\"model\":\"\xff\"}").is_none());
        assert!(agrees(b"{\"user\":\"\xff\",\"messages\":[]}"));
    }

    /// A string the walk keeps: plain text, non-ASCII and short escapes (a
    /// `\\u` one, from [`string`], is left to serde).
    fn text(rng: &mut StdRng, out: &mut String) {
        if rng.random_range(0..8) == 0 {
            return string(rng, out);
        }
        out.push('"');
        for _ in 0..rng.random_range(0..6) {
            out.push_str(
                ["Hello", " ", "é", "😀", "\\n", "\\\"", "\\\\", "\\/"][rng.random_range(0..8)],
            );
        }
        out.push('"');
    }

    /// One `content` part: mostly an object read by its `type`.
    fn part(rng: &mut StdRng, out: &mut String) {
        if rng.random_range(0..5) == 0 {
            return value(rng, 2, out);
        }
        object_of(
            rng,
            out,
            &["type", "text", "refusal", "image_url", "t\\u0079pe"],
            &mut |rng, key, out| match key {
                "type" if rng.random_range(0..4) > 0 => out.push_str(
                    [
                        "\"text\"",
                        "\"image_url\"",
                        "\"refusal\"",
                        "\"input_image\"",
                        "\"image\"",
                    ][rng.random_range(0..5)],
                ),
                "text" | "refusal" => text(rng, out),
                _ => value(rng, 2, out),
            },
        );
    }

    /// One entry of `messages`: mostly an object, its `content` a string or
    /// a list of parts.
    fn message(rng: &mut StdRng, out: &mut String) {
        if rng.random_range(0..6) == 0 {
            return value(rng, 1, out);
        }
        object_of(
            rng,
            out,
            &["role", "content", "content", "name", "tool_calls", "é"],
            &mut |rng, key, out| match key {
                "content" if rng.random_range(0..2) == 0 => array_of(rng, out, 4, &mut part),
                "content" | "role" | "name" => text(rng, out),
                _ => value(rng, 1, out),
            },
        );
    }

    fn body(rng: &mut StdRng) -> String {
        let mut out = String::new();
        object_of(
            rng,
            &mut out,
            &[
                "messages",
                "messages",
                "messages",
                "tools",
                "functions",
                "model",
                "max_tokens",
                "max_completion_tokens",
                "max_output_tokens",
                "n",
                "stream_options",
                "stream",
            ],
            &mut |rng, key, out| match key {
                "messages" if rng.random_range(0..5) > 0 => {
                    ws(rng, out);
                    array_of(rng, out, 4, &mut message);
                }
                _ => value(rng, 0, out),
            },
        );
        out
    }

    /// Generated bodies with every shape the visitors tell apart, and each
    /// broken in a few ways: whenever the walk answers, serde reads the same.
    #[test]
    fn generated_and_broken_bodies_read_as_serde_reads_them() {
        let mut rng = StdRng::seed_from_u64(11);
        let (mut walked, mut valid) = (0, 0);
        for _ in 0..20_000 {
            let body = body(&mut rng);
            if ChatBody::read_with_serde(body.as_bytes()).is_some() {
                valid += 1;
            }
            if agrees(body.as_bytes()) {
                walked += 1;
            }
            for _ in 0..4 {
                agrees(&mutate(&mut rng, body.as_bytes()));
            }
        }
        // The generator's nested objects often have keys with escapes or
        // outside ASCII, which the walk leaves to serde (real bodies' keys
        // are plain): still, over 7,000 valid bodies are walked.
        assert!(walked * 10 > valid * 4, "{walked} of {valid}");
    }
}
