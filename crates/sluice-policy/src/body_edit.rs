//! The two edits Sluice makes to a JSON request body on its way to a
//! backend, both byte splices that leave every other byte as the client sent
//! it:
//!
//! - the v1 API names the deployment in the body's `model`; a backend whose
//!   deployment has another name (`backends[].deployments`) gets its own name
//!   there, on every attempt at it;
//! - a chat or completions stream that did not ask for
//!   `stream_options.include_usage` gets it, when a token step needs the
//!   backend's usage (the extra usage chunk is then kept from the client).

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

/// A request body that is edited on its way: the body as the client sent
/// it, what to edit, and the body of the attempt under way. Its `Debug`
/// shows sizes only: the body is the caller's content.
pub struct BodyEdit {
    pub plan: BodyPlan,
    /// The body as the client sent it.
    pub body: Bytes,
    /// The body sent to the current attempt's backend, when it differs from
    /// `body`. Written when the attempt's head is built; taken by the body
    /// step.
    pub attempt: Option<Bytes>,
}

impl std::fmt::Debug for BodyEdit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyEdit")
            .field("body_len", &self.body.len())
            .field("renames_model", &self.plan.model.is_some())
            .field("adds_usage", &self.plan.adds_usage())
            .field("attempt_len", &self.attempt.as_ref().map(Bytes::len))
            .finish()
    }
}

impl BodyEdit {
    /// The body for an attempt at a backend that names the deployment
    /// `model` (`None`: as the client named it), remembered as the
    /// attempt's. `None` when it is the client's body unchanged.
    pub fn for_attempt(&mut self, model: Option<&str>) -> Option<&Bytes> {
        self.attempt = self.plan.apply(&self.body, model);
        self.attempt.as_ref()
    }
}

/// The top-level members of a request body that Sluice may edit.
#[derive(Deserialize)]
struct Top<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    model: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
}

/// A member that is there, even as `null`, is `Some` (its raw text).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The top-level members of a JSON object body (serde would also read a
/// struct from an array: that is not a body to edit).
fn top(body: &[u8]) -> Option<Top<'_>> {
    if body.get(first_byte(body)) != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// What can be edited in one request body, found once before routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BodyPlan {
    /// The `model` value's bytes (a JSON string, quotes included) and its text.
    model: Option<(Range<usize>, String)>,
    /// Where `include_usage: true` goes, and what is written there.
    usage: Option<(Range<usize>, String)>,
    /// What the body holds for `stream_options`, read with `model`.
    options: Options,
    /// The `model` bytes are a form field's raw text (a multipart upload),
    /// not a JSON string.
    raw_model: bool,
}

/// The body's `stream_options` member, as first read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Options {
    /// Not a JSON object body: nothing can be added.
    #[default]
    NotAnObject,
    /// No member; the object opens at this byte.
    Absent { open: usize },
    /// The member's value bytes.
    Present(Range<usize>),
}

/// Where the `stream_options` member stands on usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageAsk {
    /// The client asked for the usage chunk itself.
    Asked,
    /// Not asked; Sluice can add it.
    Addable,
    /// `stream_options` is there but not an object or null: left alone.
    Unusable,
}

/// Where the body's first byte that is not whitespace is.
fn first_byte(body: &[u8]) -> usize {
    body.iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(0)
}

/// The byte range of `raw` inside `body` (`raw` borrows from `body`).
fn span(body: &[u8], raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.get().len()
}

/// The top-level members of a request body the gateway reads before
/// routing (`stream`, `model`, `stream_options`, `store`), found in one walk
/// over a body read whole, for [`BodyTop::stream_flag`],
/// [`BodyTop::store_flag`] and [`BodyPlan::read`].
/// A body that cannot hold a `stream` key is not walked (its flag is false,
/// and a plan for it is read by [`BodyPlan::new`]); one the walk leaves to a
/// full parser (see [`sluice_tokens::top_members`]) is read by those parsers.
#[derive(Debug, Clone, Default)]
pub struct BodyTop(Walk, usize);

#[derive(Debug, Clone, Default)]
enum Walk {
    /// Not read (a body that did not come whole).
    #[default]
    Unread,
    /// No `stream` key can be in the body, nor a `store` key.
    NoStream,
    /// The members, found by the walk.
    Walked([sluice_tokens::TopMember; 4]),
    /// Left to the full parsers.
    Unsure,
}

impl BodyTop {
    /// Reads `body`: a look for a possible `stream` or `store` key, then one
    /// walk.
    pub fn read(body: &[u8]) -> Self {
        let hints = crate::stream_tag::key_hints(body);
        if !hints.stream && !hints.store {
            return BodyTop(Walk::NoStream, body.len());
        }
        BodyTop(
            match sluice_tokens::top_members(body, ["stream", "model", "stream_options", "store"]) {
                Some(members) => Walk::Walked(members),
                None => Walk::Unsure,
            },
            body.len(),
        )
    }

    /// Whether this was read from `body` (by its length: the callers keep
    /// the two together).
    fn of(&self, body: &[u8]) -> bool {
        matches!(self.0, Walk::Unread) || self.1 == body.len()
    }

    /// The `x-ms-stream` flag of `body` (the body this was read from), as
    /// [`crate::stream_flag`] decides it.
    pub fn stream_flag(&self, body: &[u8]) -> bool {
        debug_assert!(self.of(body), "a BodyTop read from another body");
        match &self.0 {
            Walk::NoStream => false,
            Walk::Walked([stream, ..]) => stream
                .value
                .as_ref()
                .is_some_and(|r| crate::stream_tag::value_is_true(&body[r.clone()])),
            Walk::Unread | Walk::Unsure => crate::stream_flag(body),
        }
    }

    /// Whether `body` (the body this was read from) asks to be stored, as
    /// [`sluice_routing::asks_to_store`] decides it (`"store": true`, given
    /// once, in a JSON object): from the walk, or by that parser when the
    /// body was not walked.
    pub fn store_flag(&self, body: &[u8]) -> bool {
        debug_assert!(self.of(body), "a BodyTop read from another body");
        match &self.0 {
            // serde refuses a member given twice, and reads a `bool` from
            // `true` or `false` only.
            Walk::Walked([.., store]) => {
                !store.repeated
                    && store
                        .value
                        .as_ref()
                        .is_some_and(|r| &body[r.clone()] == b"true")
            }
            // Neither `"store"` nor an escape that could spell it.
            Walk::NoStream => false,
            Walk::Unread | Walk::Unsure => {
                crate::stream_tag::key_hints(body).store && sluice_routing::asks_to_store(body)
            }
        }
    }
}

impl BodyPlan {
    /// [`BodyPlan::new`] with the members `top` found in `body` (already
    /// checked as serde checks them): the same plan without a second parse.
    pub fn read(body: &[u8], top: &BodyTop) -> Self {
        debug_assert!(top.of(body), "a BodyTop read from another body");
        let Walk::Walked([_, model, options, _]) = &top.0 else {
            return BodyPlan::new(body);
        };
        if model.repeated || options.repeated {
            // serde refuses a struct member given twice: nothing to edit.
            return BodyPlan::default();
        }
        BodyPlan::of_members(body, model.value.clone(), options.value.clone())
    }

    /// Reads `body`'s top-level `model` (when it is a string). A body that
    /// is not a JSON object, or repeats one of the members, has nothing to
    /// edit.
    pub fn new(body: &[u8]) -> Self {
        let Some(top) = top(body) else {
            return BodyPlan::default();
        };
        BodyPlan::of_members(
            body,
            top.model.map(|raw| span(body, raw)),
            top.stream_options.map(|raw| span(body, raw)),
        )
    }

    /// The plan for a JSON object body whose top-level `model` and
    /// `stream_options` values lie at these ranges (each given once).
    fn of_members(body: &[u8], model: Option<Range<usize>>, options: Option<Range<usize>>) -> Self {
        let model = model.and_then(|r| {
            let name = serde_json::from_slice::<String>(&body[r.clone()]).ok()?;
            Some((r, name))
        });
        let options = match options {
            Some(r) => Options::Present(r),
            None => Options::Absent {
                open: first_byte(body),
            },
        };
        BodyPlan {
            model,
            usage: None,
            options,
            raw_model: false,
        }
    }

    /// The plan for a multipart upload whose `model` form field's value is
    /// `body[range]`: only the deployment is renamed, as raw text.
    pub fn form_model(range: Range<usize>, value: String) -> Self {
        BodyPlan {
            model: Some((range, value)),
            usage: None,
            options: Options::NotAnObject,
            raw_model: true,
        }
    }

    /// The body's `model`, when it is a string.
    pub fn model(&self) -> Option<&str> {
        self.model.as_ref().map(|(_, m)| m.as_str())
    }

    /// Plan adding `stream_options.include_usage: true` to `body` (the body
    /// this plan was made from). Says where the body stands; only
    /// [`UsageAsk::Addable`] plans an edit.
    pub fn ask_usage(&mut self, body: &[u8]) -> UsageAsk {
        let range = match &self.options {
            Options::NotAnObject => return UsageAsk::Unusable,
            Options::Absent { open } => {
                // No member: add one right after the opening brace. The
                // body has other members (`stream` at least), so a comma
                // follows.
                let open = *open;
                if body.get(open) != Some(&b'{') || !has_members(&body[open + 1..]) {
                    return UsageAsk::Unusable;
                }
                let at = open + 1;
                self.usage = Some((at..at, r#""stream_options":{"include_usage":true},"#.into()));
                return UsageAsk::Addable;
            }
            Options::Present(range) => range.clone(),
        };
        let Some(text) = body
            .get(range.clone())
            .and_then(|t| std::str::from_utf8(t).ok())
        else {
            return UsageAsk::Unusable;
        };
        if text == "null" {
            self.usage = Some((range, r#"{"include_usage":true}"#.into()));
            return UsageAsk::Addable;
        }
        let Ok(mut options) =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
        else {
            return UsageAsk::Unusable;
        };
        if options.get("include_usage") == Some(&serde_json::Value::Bool(true)) {
            return UsageAsk::Asked;
        }
        options.insert("include_usage".into(), serde_json::Value::Bool(true));
        let Ok(edited) = serde_json::to_string(&options) else {
            return UsageAsk::Unusable;
        };
        self.usage = Some((range, edited));
        UsageAsk::Addable
    }

    /// Whether [`ask_usage`](Self::ask_usage) planned an edit.
    pub fn adds_usage(&self) -> bool {
        self.usage.is_some()
    }

    /// The body to send to a backend that names the deployment `model`
    /// (`None`: the client's own name), or `None` when it is `body` unchanged.
    pub fn apply(&self, body: &[u8], model: Option<&str>) -> Option<Bytes> {
        let mut edits: Vec<(Range<usize>, String)> = Vec::with_capacity(2);
        if let (Some(name), Some((range, current))) = (model, &self.model)
            && name != current
        {
            let text = if self.raw_model {
                name.to_string()
            } else {
                serde_json::to_string(name).ok()?
            };
            edits.push((range.clone(), text));
        }
        if let Some(usage) = &self.usage {
            edits.push(usage.clone());
        }
        if edits.is_empty() {
            return None;
        }
        edits.sort_by_key(|(r, _)| r.start);
        let grow: usize = edits.iter().map(|(_, s)| s.len()).sum();
        let mut out = BytesMut::with_capacity(body.len() + grow);
        let mut at = 0;
        for (range, text) in &edits {
            out.extend_from_slice(body.get(at..range.start)?);
            out.extend_from_slice(text.as_bytes());
            at = range.end;
        }
        out.extend_from_slice(body.get(at..)?);
        Some(out.freeze())
    }
}

/// Whether the inside of an object (after `{`) holds a member.
fn has_members(inner: &[u8]) -> bool {
    inner
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'"')
}

/// Whether an api-version accepts `stream_options` (Azure added it in
/// 2024-09-01-preview and every version since). A version that is not a
/// date is not known to.
pub fn api_version_takes_stream_options(version: &str) -> bool {
    let date = version.get(..10).unwrap_or("");
    let digits = |r: Range<usize>| {
        date.get(r)
            .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()))
    };
    let shaped =
        digits(0..4) && digits(5..7) && digits(8..10) && &date[4..5] == "-" && &date[7..8] == "-";
    shaped && (version.len() == 10 || version.as_bytes()[10] == b'-') && date >= "2024-09-01"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_field_is_renamed_as_raw_text() {
        let body =
            b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--b--\r\n";
        let start = body.windows(7).position(|w| w == b"whisper").unwrap();
        let mut plan = BodyPlan::form_model(start..start + 7, "whisper".into());
        assert_eq!(plan.model(), Some("whisper"));
        assert!(!plan.adds_usage());
        assert_eq!(plan.ask_usage(body), UsageAsk::Unusable);
        let out = plan.apply(body, Some("whisper-\"west\"")).unwrap();
        assert_eq!(
            &out[..],
            &b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-\"west\"\r\n--b--\r\n"[..]
        );
        assert_eq!(plan.apply(body, Some("whisper")), None);
        assert_eq!(plan.apply(body, None), None);
    }
    use serde_json::{Value, json};

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "another body")]
    fn a_body_top_is_used_only_with_its_own_body() {
        let top = BodyTop::read(br#"{"stream":true}"#);
        // The default (nothing read) goes with any body.
        assert!(!BodyTop::default().stream_flag(b"{}"));
        assert!(top.stream_flag(br#"{"stream":true}"#));
        top.stream_flag(br#"{"stream":false,"x":1}"#);
    }

    /// Generated request bodies, and each broken: the one walk reads the
    /// stream flag as the probe does, and the plan as serde does.
    #[test]
    fn the_one_walk_reads_the_flag_and_the_plan_as_the_full_readers_do() {
        const KEYS: &[&str] = &[
            "stream",
            "stream",
            "model",
            "stream_options",
            "store",
            "store",
            "messages",
            "Stream",
            "str\\u0065am",
            "é",
        ];
        const VALUES: &[&str] = &[
            "true",
            "false",
            "null",
            "1",
            "-2.5e3",
            "\"true\"",
            "\"TRUE\"",
            "\"tr\\u0075e\"",
            "\"\\ud800\"",
            "\"true \"",
            "\"gpt-4o\"",
            "\"gpt\\u002d4o\"",
            "\"caf\u{e9}\"",
            "{\"include_usage\":true}",
            "{}",
            "[{\"stream\":true},\"x\"]",
            "[]",
            "\"a\\\"b\"",
        ];
        let mut seed = 0x2545_f491_u32;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as usize % n
        };
        let (mut walked, mut bodies, mut stored) = (0, 0, 0);
        for _ in 0..20_000 {
            let mut body = String::from(["{", " {", "{\n"][next(3)]);
            for m in 0..next(5) {
                if m > 0 {
                    body.push(',');
                }
                body.push_str(&format!(
                    "\"{}\"{}:{}",
                    KEYS[next(KEYS.len())],
                    [" ", ""][next(2)],
                    VALUES[next(VALUES.len())]
                ));
            }
            body.push_str(["}", "} ", "}\n"][next(3)]);
            let mut broken = body.clone().into_bytes();
            let at = next(broken.len() + 1);
            match next(4) {
                0 if at < broken.len() => {
                    broken.remove(at);
                }
                1 if at < broken.len() => broken[at] = b"{}[],:\"\\ tnu\xff"[next(13)],
                2 => broken.insert(at, b"{}[],:\"\\ tnu\xff"[next(13)]),
                _ => broken.truncate(at),
            }
            for b in [body.as_bytes(), &broken] {
                let top = BodyTop::read(b);
                bodies += usize::from(!matches!(top.0, Walk::NoStream));
                walked += usize::from(matches!(top.0, Walk::Walked(_)));
                assert_eq!(
                    top.stream_flag(b),
                    crate::stream_flag(b),
                    "{}",
                    String::from_utf8_lossy(b)
                );
                assert_eq!(
                    BodyPlan::read(b, &top),
                    BodyPlan::new(b),
                    "{}",
                    String::from_utf8_lossy(b)
                );
                // Walked, ruled out, or left to the parser (and unread):
                // the same answer as the parser's.
                let store = top.store_flag(b);
                stored += usize::from(store);
                for flag in [store, BodyTop::default().store_flag(b)] {
                    assert_eq!(
                        flag,
                        sluice_routing::asks_to_store(b),
                        "{}",
                        String::from_utf8_lossy(b)
                    );
                }
            }
        }
        // Of those that may hold a `stream` key, many were walked rather
        // than left to the full readers (the others are broken, or have a
        // key with an escape or outside ASCII).
        assert!(walked * 10 > bodies * 3, "{walked} of {bodies}");
        // Bodies that ask to be stored were among them.
        assert!(stored > 100, "{stored}");
    }

    fn parse(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn reads_the_model_wherever_it_is() {
        let body =
            br#"{"messages":[{"role":"user","content":"{\"model\":\"x\"}"}],"model":"gpt-4o"}"#;
        let plan = BodyPlan::new(body);
        assert_eq!(plan.model(), Some("gpt-4o"));
        // Escapes are decoded.
        assert_eq!(
            BodyPlan::new(br#"{"model":"gpt\u002d4o"}"#).model(),
            Some("gpt-4o")
        );
        // Not a string, not an object, invalid, or repeated: nothing.
        assert_eq!(BodyPlan::new(br#"{"model":4}"#).model(), None);
        assert_eq!(BodyPlan::new(br#"["model"]"#).model(), None);
        assert_eq!(BodyPlan::new(br#"{"model":"a""#).model(), None);
        assert_eq!(BodyPlan::new(br#"{"model":"a","model":"b"}"#).model(), None);
        assert_eq!(BodyPlan::new(b"").model(), None);
        assert_eq!(BodyPlan::new(br#"{"input":"x"}"#).model(), None);
    }

    #[test]
    fn renames_only_the_model_value() {
        let body = br#"{ "model" : "gpt-4o" , "input":"model gpt-4o"}"#;
        let plan = BodyPlan::new(body);
        let out = plan.apply(body, Some("gpt-4o-eu")).unwrap();
        assert_eq!(
            &out[..],
            br#"{ "model" : "gpt-4o-eu" , "input":"model gpt-4o"}"#
        );
        // Same name, or no name: unchanged, no copy.
        assert_eq!(plan.apply(body, Some("gpt-4o")), None);
        assert_eq!(plan.apply(body, None), None);
        // A name needing escapes is written as JSON.
        let out = plan.apply(body, Some("a\"b")).unwrap();
        assert_eq!(parse(&out)["model"], "a\"b");
        // No model in the body: nothing to rename.
        let plain = br#"{"input":"x"}"#;
        assert_eq!(BodyPlan::new(plain).apply(plain, Some("y")), None);
    }

    #[test]
    fn an_edit_makes_each_attempts_body_and_prints_no_content() {
        let body = Bytes::from_static(br#"{"model":"gpt-4o","input":"secret words"}"#);
        let mut edit = BodyEdit {
            plan: BodyPlan::new(&body),
            body: body.clone(),
            attempt: None,
        };
        let renamed = edit.for_attempt(Some("gpt-4o-eu")).cloned().unwrap();
        assert_eq!(parse(&renamed)["model"], "gpt-4o-eu");
        assert_eq!(edit.attempt.as_ref(), Some(&renamed));
        // The next attempt's backend keeps the name: the client's body, and
        // no stale edit left behind.
        assert_eq!(edit.for_attempt(None), None);
        assert_eq!(edit.attempt, None);
        edit.for_attempt(Some("x"));
        let printed = format!("{edit:?}");
        assert!(!printed.contains("secret"), "{printed}");
        assert!(printed.contains("body_len: 41"), "{printed}");
        assert!(printed.contains("attempt_len: Some(36)"), "{printed}");
    }

    #[test]
    fn adds_include_usage_in_each_shape() {
        // No stream_options: added first, the rest unchanged.
        let body = br#"  {"stream":true,"model":"m"}"#;
        let mut plan = BodyPlan::new(body);
        assert_eq!(plan.ask_usage(body), UsageAsk::Addable);
        assert!(plan.adds_usage());
        let out = plan.apply(body, None).unwrap();
        assert_eq!(
            &out[..],
            br#"  {"stream_options":{"include_usage":true},"stream":true,"model":"m"}"#
        );
        // With a rename as well, both edits land.
        let out = plan.apply(body, Some("m2")).unwrap();
        let v = parse(&out);
        assert_eq!(v["model"], "m2");
        assert_eq!(v["stream_options"], json!({"include_usage": true}));
        assert_eq!(v["stream"], true);

        // An object without it, or with false: set, other options kept.
        for opts in [r#"{"x":1}"#, r#"{"include_usage":false,"x":1}"#] {
            let body = format!(r#"{{"model":"m","stream":true,"stream_options":{opts}}}"#);
            let mut plan = BodyPlan::new(body.as_bytes());
            assert_eq!(plan.ask_usage(body.as_bytes()), UsageAsk::Addable);
            let v = parse(&plan.apply(body.as_bytes(), Some("n")).unwrap());
            assert_eq!(v["stream_options"], json!({"include_usage": true, "x": 1}));
            assert_eq!(v["model"], "n");
        }
        // null: replaced.
        let body = br#"{"stream":true,"stream_options":null}"#;
        let mut plan = BodyPlan::new(body);
        assert_eq!(plan.ask_usage(body), UsageAsk::Addable);
        assert_eq!(
            &plan.apply(body, None).unwrap()[..],
            br#"{"stream":true,"stream_options":{"include_usage":true}}"#
        );
        // Already asked: nothing to do.
        let body = br#"{"stream":true,"stream_options":{"include_usage":true}}"#;
        let mut plan = BodyPlan::new(body);
        assert_eq!(plan.ask_usage(body), UsageAsk::Asked);
        assert!(!plan.adds_usage());
        assert_eq!(plan.apply(body, None), None);
        // Something else, an empty object, or no object at all: left alone.
        for body in [
            &br#"{"stream":true,"stream_options":"x"}"#[..],
            br#"{ }"#,
            br#"[1]"#,
            b"   ",
            br#"{"stream":true,"stream_options":{},"stream_options":{}}"#,
        ] {
            let mut plan = BodyPlan::new(body);
            assert_eq!(plan.ask_usage(body), UsageAsk::Unusable, "{body:?}");
            assert_eq!(plan.apply(body, None), None);
        }
    }

    #[test]
    fn api_versions_that_take_stream_options() {
        for v in [
            "2024-09-01-preview",
            "2024-10-21",
            "2025-04-01-preview",
            "2024-09-01",
        ] {
            assert!(api_version_takes_stream_options(v), "{v}");
        }
        for v in [
            "2024-08-01-preview",
            "2024-06-01",
            "2023-05-15",
            "preview",
            "latest",
            "",
            "2024-10-2",
            "2024-10-21x",
            "2024/10/21",
            "2O24-10-21",
            "2024-1a-21",
            "2024-10-2a",
        ] {
            assert!(!api_version_takes_stream_options(v), "{v}");
        }
    }
}
