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
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
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

/// The byte range of `raw` inside `body` (`raw` borrows from `body`).
fn span(body: &[u8], raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.get().len()
}

impl BodyPlan {
    /// Reads `body`'s top-level `model` (when it is a string). A body that
    /// is not a JSON object, or repeats one of the members, has nothing to
    /// edit.
    pub fn new(body: &[u8]) -> Self {
        let Some(top) = top(body) else {
            return BodyPlan::default();
        };
        let model = top.model.and_then(|raw| {
            let name = serde_json::from_str::<String>(raw.get()).ok()?;
            Some((span(body, raw), name))
        });
        let options = match top.stream_options {
            Some(raw) => Options::Present(span(body, raw)),
            None => Options::Absent {
                open: body
                    .iter()
                    .position(|b| !b.is_ascii_whitespace())
                    .unwrap_or(0),
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
