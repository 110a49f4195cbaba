//! Forgiving serde shapes for reading streamed events: each accepts any JSON value in its place
//! (so one odd member never makes the whole event unreadable), keeps only what is asked for, and
//! borrows strings from the input when they have no escapes (no allocation per event).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A string member: `Some` when the value is a JSON string (also an integer when `NUMBERS`, for
/// error codes, which some backends send as numbers); `None` for anything else.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Text<'a, const NUMBERS: bool = false>(pub(crate) Option<Cow<'a, str>>);

/// An error code: a string or an integer.
pub(crate) type Code<'a> = Text<'a, true>;

impl<'a, const NUMBERS: bool> Text<'a, NUMBERS> {
    pub(crate) fn as_str(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl<'de: 'a, 'a, const NUMBERS: bool> Deserialize<'de> for Text<'a, NUMBERS> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TextVisitor::<NUMBERS>)
            .map(|seen| Text(seen.into_option()))
    }
}

/// What a visitor found: the value it wants, or something else (skipped).
#[derive(Debug, PartialEq, Eq)]
enum Seen<T> {
    Wanted(T),
    Other,
}

impl<T> Seen<T> {
    fn into_option(self) -> Option<T> {
        match self {
            Seen::Wanted(v) => Some(v),
            Seen::Other => None,
        }
    }
}

struct TextVisitor<const NUMBERS: bool>;

impl<'de, const NUMBERS: bool> Visitor<'de> for TextVisitor<NUMBERS> {
    type Value = Seen<Cow<'de, str>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Seen::Wanted(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Seen::Wanted(Cow::Owned(v.to_owned())))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(number(NUMBERS, v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(number(NUMBERS, v))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Seen::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Seen::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Seen::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|_| Seen::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map).map(|_| Seen::Other)
    }
}

/// An integer as text when `wanted`.
fn number<'de>(wanted: bool, v: impl ToString) -> Seen<Cow<'de, str>> {
    if wanted {
        Seen::Wanted(Cow::Owned(v.to_string()))
    } else {
        Seen::Other
    }
}

/// Reads the rest of an array, returning how many elements it had.
fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<usize, A::Error> {
    let mut n = 0;
    while seq.next_element::<IgnoredAny>()?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// Reads the rest of an object.
fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// An `error` or `incomplete_details` member: `Some` when it is an object, with its `code` and
/// `reason` when those are strings (or integer codes). Its `message` is never read.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Detail<'a>(pub(crate) Option<DetailFields<'a>>);

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct DetailFields<'a> {
    pub(crate) code: Code<'a>,
    pub(crate) reason: Text<'a>,
}

impl Detail<'_> {
    /// The object's `code`.
    pub(crate) fn code(&self) -> Option<&str> {
        self.0.as_ref().and_then(|f| f.code.as_str())
    }

    /// The object's `reason`.
    pub(crate) fn reason(&self) -> Option<&str> {
        self.0.as_ref().and_then(|f| f.reason.as_str())
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Detail<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DetailVisitor)
            .map(|seen| Detail(seen.into_option()))
    }
}

struct DetailVisitor;

impl<'de> Visitor<'de> for DetailVisitor {
    type Value = Seen<DetailFields<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = DetailFields::default();
        while let Some(key) = map.next_key::<Text<'de>>()? {
            match key.as_str() {
                Some("code") => fields.code = map.next_value()?,
                Some("reason") => fields.reason = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Seen::Wanted(fields))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|_| Seen::Other)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Seen::Other)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Seen::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Seen::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Seen::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Seen::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Seen::Other)
    }
}

/// The shape of a JSON value other than `null` (read it as an `Option<Shape>`), its content
/// skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// `[]`
    EmptyArray,
    /// An array with at least one element.
    Array,
    /// An object (empty or not).
    Object,
    /// A string, number or boolean.
    Scalar,
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Shape, A::Error> {
        Ok(match skip_seq(seq)? {
            0 => Shape::EmptyArray,
            _ => Shape::Array,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Shape, A::Error> {
        skip_map(map).map(|()| Shape::Object)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::Scalar)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Scalar)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Scalar)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Scalar)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Scalar)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize, Debug, Default, PartialEq)]
    #[serde(default)]
    struct Probe<'a> {
        #[serde(borrow)]
        t: Text<'a>,
        #[serde(borrow)]
        c: Code<'a>,
        #[serde(borrow)]
        d: Detail<'a>,
        s: Option<Shape>,
    }

    fn probe(json: &str) -> Probe<'_> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn text_takes_strings_only_and_borrows() {
        let p = probe(r#"{"t":"abc"}"#);
        assert!(matches!(p.t.0, Some(Cow::Borrowed("abc"))));
        let p = probe(r#"{"t":"a\"c"}"#);
        assert_eq!(p.t.as_str(), Some("a\"c"));
        for v in [
            "1",
            "-1",
            "1.5",
            "true",
            "null",
            "[1,[2]]",
            r#"{"a":{"b":1}}"#,
        ] {
            let json = format!(r#"{{"t":{v},"s":1}}"#);
            let p = probe(&json);
            assert_eq!(p.t.as_str(), None, "{v}");
            assert_eq!(p.s, Some(Shape::Scalar), "{v}: the rest is still read");
        }
    }

    #[test]
    fn codes_take_strings_and_integers() {
        assert_eq!(
            probe(r#"{"c":"rate_limit"}"#).c.as_str(),
            Some("rate_limit")
        );
        assert_eq!(probe(r#"{"c":429}"#).c.as_str(), Some("429"));
        assert_eq!(probe(r#"{"c":-2}"#).c.as_str(), Some("-2"));
        for v in ["1.5", "false", "null", "[\"x\"]", r#"{"x":"y"}"#] {
            assert_eq!(probe(&format!(r#"{{"c":{v}}}"#)).c.as_str(), None, "{v}");
        }
    }

    #[test]
    fn details_read_code_and_reason_of_objects() {
        let p = probe(
            r#"{"d":{"message":"m","code":"server_error","x":[1,{"code":"no"}],"reason":"max_output_tokens"}}"#,
        );
        let d = p.d.0.unwrap();
        assert_eq!(d.code.as_str(), Some("server_error"));
        assert_eq!(d.reason.as_str(), Some("max_output_tokens"));
        let d = probe(r#"{"d":{}}"#).d.0.unwrap();
        assert_eq!((d.code.as_str(), d.reason.as_str()), (None, None));
        for v in [
            "\"e\"",
            "1",
            "-1",
            "1.5",
            "true",
            "null",
            "[{\"code\":\"x\"}]",
        ] {
            let json = format!(r#"{{"d":{v},"s":[]}}"#);
            let p = probe(&json);
            assert_eq!(p.d, Detail(None), "{v}");
            assert_eq!(p.s, Some(Shape::EmptyArray), "{v}");
        }
    }

    #[test]
    fn shapes() {
        let cases = [
            ("[]", Shape::EmptyArray),
            ("[ ]", Shape::EmptyArray),
            ("[[]]", Shape::Array),
            ("[1,2,{\"a\":[]}]", Shape::Array),
            ("{}", Shape::Object),
            ("{\"a\":[1]}", Shape::Object),
            ("\"x\"", Shape::Scalar),
            ("1", Shape::Scalar),
            ("-1", Shape::Scalar),
            ("1e3", Shape::Scalar),
            ("false", Shape::Scalar),
        ];
        for (v, shape) in cases {
            let json = format!(r#"{{"s":{v},"t":"after"}}"#);
            let p = probe(&json);
            assert_eq!(p.s, Some(shape), "{v}");
            assert_eq!(p.t.as_str(), Some("after"), "{v}");
        }
        assert_eq!(probe(r#"{"s":null}"#).s, None);
        assert_eq!(probe("{}").s, None);
    }

    #[test]
    fn visitors_expect_anything() {
        // Never shown (they accept every value), but say so if they ever are.
        let expected = [
            format!("{}", &TextVisitor::<false> as &dyn de::Expected),
            format!("{}", &DetailVisitor as &dyn de::Expected),
            format!("{}", &ShapeVisitor as &dyn de::Expected),
        ];
        assert_eq!(expected, ["any JSON value"; 3].map(String::from));
    }

    #[test]
    fn skipping_counts_elements() {
        struct Count(usize);
        impl<'de> Deserialize<'de> for Count {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = usize;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("an array")
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<usize, A::Error> {
                        skip_seq(seq)
                    }
                }
                d.deserialize_seq(V).map(Count)
            }
        }
        for (json, n) in [("[]", 0), ("[1]", 1), ("[[1,2],{\"a\":[]},3]", 3)] {
            assert_eq!(serde_json::from_str::<Count>(json).unwrap().0, n, "{json}");
        }
    }
}
