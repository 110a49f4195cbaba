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
