//! Recording a trace while its request runs.
//!
//! A traced request carries a [`Recorder`] in its context. Each step adds an
//! event: the section, the source (the policy or handler), when, and a small
//! value ([`Val`]) with static keys. Nothing is formatted while the request
//! runs: timestamps stay monotonic instants, numbers stay numbers, and the
//! JSON `listTrace` returns is built from the events when it is read
//! ([`Recorder::to_trace`]). Requests that are not traced have no recorder
//! and pay nothing but a `None` check at each step.

use std::borrow::Cow;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};

use crate::{Section, Trace};

/// The most events one trace keeps; later ones are counted, not kept, so a
/// pathological request cannot grow its trace without bound.
pub const MAX_EVENTS: usize = 256;

/// A value in a trace entry's `data`: JSON, with keys that are static
/// strings so that building one allocates little.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(Cow<'static, str>),
    /// An object whose keys are known at compile time, in order.
    Obj(Vec<(&'static str, Val)>),
    Arr(Vec<Val>),
    /// A header list, written as APIM writes one: `[{"name", "value"}]`.
    Headers(Vec<(String, String)>),
    /// The same, kept as a header map (values already redacted): cloning
    /// one shares its values' bytes instead of copying every header into
    /// two strings, and dropping it frees one table.
    Map(http::HeaderMap),
}

impl Val {
    /// An object from `(key, value)` pairs.
    pub fn obj<const N: usize>(fields: [(&'static str, Val); N]) -> Val {
        Val::Obj(fields.into())
    }

    /// A text value.
    pub fn text(s: impl Into<Cow<'static, str>>) -> Val {
        Val::Str(s.into())
    }

    /// The JSON this value stands for.
    pub fn to_json(&self) -> Value {
        match self {
            Val::Null => Value::Null,
            Val::Bool(b) => Value::Bool(*b),
            Val::U64(n) => Value::from(*n),
            Val::I64(n) => Value::from(*n),
            Val::F64(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Val::Str(s) => Value::String(s.to_string()),
            Val::Obj(fields) => {
                let mut m = Map::with_capacity(fields.len());
                for (k, v) in fields {
                    m.insert((*k).to_string(), v.to_json());
                }
                Value::Object(m)
            }
            Val::Arr(items) => Value::Array(items.iter().map(Val::to_json).collect()),
            Val::Map(map) => Value::Array(
                map.iter()
                    .map(|(n, v)| {
                        let mut m = Map::with_capacity(2);
                        m.insert("name".into(), Value::String(n.as_str().to_string()));
                        m.insert(
                            "value".into(),
                            Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                        );
                        Value::Object(m)
                    })
                    .collect(),
            ),
            Val::Headers(list) => Value::Array(
                list.iter()
                    .map(|(n, v)| {
                        let mut m = Map::with_capacity(2);
                        m.insert("name".into(), Value::String(n.clone()));
                        m.insert("value".into(), Value::String(v.clone()));
                        Value::Object(m)
                    })
                    .collect(),
            ),
        }
    }

    /// Roughly the memory this value holds, for the store's byte bound.
    pub fn approx_bytes(&self) -> usize {
        let own = std::mem::size_of::<Val>();
        own + match self {
            Val::Null | Val::Bool(_) | Val::U64(_) | Val::I64(_) | Val::F64(_) => 0,
            Val::Str(Cow::Borrowed(_)) => 0,
            Val::Str(Cow::Owned(s)) => s.capacity(),
            Val::Obj(fields) => fields
                .iter()
                .map(|(_, v)| v.approx_bytes() + std::mem::size_of::<&str>())
                .sum(),
            Val::Arr(items) => items.iter().map(Val::approx_bytes).sum(),
            Val::Map(map) => map
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 2 * std::mem::size_of::<usize>() * 4)
                .sum(),
            Val::Headers(list) => list
                .iter()
                .map(|(n, v)| n.capacity() + v.capacity() + 2 * std::mem::size_of::<String>())
                .sum(),
        }
    }
}

impl serde::Serialize for Val {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self {
            Val::Null => s.serialize_unit(),
            Val::Bool(b) => s.serialize_bool(*b),
            Val::U64(n) => s.serialize_u64(*n),
            Val::I64(n) => s.serialize_i64(*n),
            // JSON writes a NaN or an infinity as null, as `to_json` does.
            Val::F64(f) => s.serialize_f64(*f),
            Val::Str(t) => s.serialize_str(t),
            Val::Obj(fields) => {
                let mut m = s.serialize_map(Some(fields.len()))?;
                for (k, v) in fields {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
            Val::Arr(items) => {
                let mut q = s.serialize_seq(Some(items.len()))?;
                for v in items {
                    q.serialize_element(v)?;
                }
                q.end()
            }
            Val::Map(map) => {
                let mut q = s.serialize_seq(Some(map.len()))?;
                for (n, v) in map {
                    q.serialize_element(&Header {
                        name: n.as_str(),
                        value: &String::from_utf8_lossy(v.as_bytes()),
                    })?;
                }
                q.end()
            }
            Val::Headers(list) => {
                let mut q = s.serialize_seq(Some(list.len()))?;
                for (n, v) in list {
                    q.serialize_element(&Header { name: n, value: v })?;
                }
                q.end()
            }
        }
    }
}

/// One header of a [`Val::Headers`] list, as it is written.
#[derive(serde::Serialize)]
struct Header<'a> {
    name: &'a str,
    value: &'a str,
}

impl From<&'static str> for Val {
    fn from(s: &'static str) -> Self {
        Val::Str(Cow::Borrowed(s))
    }
}

impl From<String> for Val {
    fn from(s: String) -> Self {
        Val::Str(Cow::Owned(s))
    }
}

impl From<u64> for Val {
    fn from(n: u64) -> Self {
        Val::U64(n)
    }
}

impl From<u32> for Val {
    fn from(n: u32) -> Self {
        Val::U64(u64::from(n))
    }
}

impl From<u16> for Val {
    fn from(n: u16) -> Self {
        Val::U64(u64::from(n))
    }
}

impl From<usize> for Val {
    fn from(n: usize) -> Self {
        Val::U64(n as u64)
    }
}

impl From<bool> for Val {
    fn from(b: bool) -> Self {
        Val::Bool(b)
    }
}

impl From<f64> for Val {
    fn from(f: f64) -> Self {
        Val::F64(f)
    }
}

impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Self {
        v.map_or(Val::Null, Into::into)
    }
}

/// One recorded step.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    section: Section,
    source: &'static str,
    /// Since the request arrived.
    at: Duration,
    data: Val,
}

/// The events of one traced request, in the order they happened.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// When the request arrived (monotonic).
    started: Instant,
    /// The same moment on the wall clock.
    wall: SystemTime,
    events: Vec<Event>,
    /// Events not kept past [`MAX_EVENTS`].
    dropped: usize,
}

impl Recorder {
    /// A recorder for a request that arrived at `started`.
    pub fn new(started: Instant) -> Self {
        let wall = SystemTime::now()
            .checked_sub(started.elapsed())
            .unwrap_or_else(SystemTime::now);
        Recorder {
            started,
            wall,
            events: Vec::with_capacity(24),
            dropped: 0,
        }
    }

    /// When the request arrived, on the wall clock.
    pub fn wall_start(&self) -> SystemTime {
        self.wall
    }

    /// Add an event that happens now.
    pub fn add(&mut self, section: Section, source: &'static str, data: Val) {
        self.add_at(section, source, Instant::now(), data);
    }

    /// Add an event that happened at `at` (events may be added late: a
    /// section's entries are ordered by time when the trace is built).
    pub fn add_at(&mut self, section: Section, source: &'static str, at: Instant, data: Val) {
        if self.events.len() >= MAX_EVENTS {
            self.dropped += 1;
            return;
        }
        self.events.push(Event {
            section,
            source,
            at: at.saturating_duration_since(self.started),
            data,
        });
    }

    /// Whether an event from `source` in `section` was recorded.
    pub fn has(&self, section: Section, source: &str) -> bool {
        self.events
            .iter()
            .any(|e| e.section == section && e.source == source)
    }

    /// Events kept so far.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Roughly the memory the recorder holds, for the store's byte bound.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self
                .events
                .iter()
                .map(|e| std::mem::size_of::<Event>() + e.data.approx_bytes())
                .sum::<usize>()
    }

    /// The trace as `listTrace` returns it: each section's entries ordered
    /// by time, timestamps on the wall clock, `elapsed` since arrival.
    pub fn to_trace(&self, service_name: &str, trace_id: &str) -> Trace {
        let mut order: Vec<&Event> = self.events.iter().collect();
        order.sort_by_key(|e| e.at);
        let mut trace = Trace::new(service_name, trace_id);
        for e in order {
            trace.push(e.section, e.source, self.wall + e.at, e.at, e.data.clone());
        }
        if self.dropped > 0 {
            let last = self.events.iter().map(|e| e.at).max().unwrap_or_default();
            trace.push(
                Section::Outbound,
                "trace",
                self.wall + last,
                last,
                Val::from(format!(
                    "{} more entries were not recorded: a trace keeps at most {MAX_EVENTS}.",
                    self.dropped
                )),
            );
        }
        trace
    }
}

/// Header values that never appear in a trace: credentials, and the names
/// configured on top of them. Names are matched case-insensitively.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    names: Vec<http::HeaderName>,
    /// Query parameters whose values are redacted in URLs.
    params: Vec<String>,
}

/// What a redacted value reads as.
pub const REDACTED: &str = "<redacted>";

/// Headers redacted always.
const ALWAYS: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "apim-debug-authorization",
    "api-key",
];

impl Redactor {
    /// Redacts [`ALWAYS`], `names` and the query parameters `params`.
    pub fn new(
        names: impl IntoIterator<Item = http::HeaderName>,
        params: impl IntoIterator<Item = String>,
    ) -> Self {
        let mut all: Vec<http::HeaderName> = ALWAYS
            .iter()
            .map(|n| http::HeaderName::from_static(n))
            .collect();
        for n in names {
            if !all.contains(&n) {
                all.push(n);
            }
        }
        Redactor {
            names: all,
            params: params.into_iter().collect(),
        }
    }

    /// Whether the header's value is hidden.
    pub fn hides(&self, name: &http::HeaderName) -> bool {
        self.names.contains(name)
    }

    /// A header list with hidden values replaced; an `Authorization`
    /// value keeps its scheme (`Bearer <redacted>`).
    pub fn headers(&self, headers: &http::HeaderMap) -> Val {
        let mut map = headers.clone();
        for (n, v) in map.iter_mut() {
            if !self.hides(n) {
                continue;
            }
            let scheme = (n == http::header::AUTHORIZATION
                || n == http::header::PROXY_AUTHORIZATION)
                .then(|| v.to_str().ok()?.split_once(' ').map(|(s, _)| s.to_string()))
                .flatten();
            *v = match scheme {
                Some(s) => http::HeaderValue::from_str(&format!("{s} {REDACTED}"))
                    .unwrap_or(http::HeaderValue::from_static(REDACTED)),
                None => http::HeaderValue::from_static(REDACTED),
            };
        }
        Val::Map(map)
    }

    /// A path and query with the values of hidden query parameters replaced.
    pub fn url(&self, path: &str, query: Option<&str>) -> String {
        let Some(q) = query else {
            return path.to_string();
        };
        let mut out = String::with_capacity(path.len() + q.len() + 1);
        out.push_str(path);
        out.push('?');
        for (i, pair) in q.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            let name = pair.split_once('=').map_or(pair, |(n, _)| n);
            // Names are compared decoded, as the gateway reads them
            // (`subscription%2Dkey` is `subscription-key`).
            let decoded = form_decode(name);
            if pair.contains('=') && self.params.iter().any(|p| p.eq_ignore_ascii_case(&decoded)) {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
            } else {
                out.push_str(pair);
            }
        }
        out
    }
}

/// A query-string component decoded as a form does (`+` is a space,
/// `%XX` a byte; bad escapes stay as they are).
fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a traced response body did as it passed: when its first bytes
/// went out, how many, how many server-sent events, and (when bodies are
/// recorded) its first bytes. O(1) per chunk but for the bounded copy.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// When the first body bytes went to the client.
    pub first: Option<Instant>,
    /// When the first server-sent event was complete (its blank line passed).
    pub first_event: Option<Instant>,
    pub bytes: u64,
    /// Server-sent events seen (blank-line separated blocks).
    pub events: u64,
    /// The first bytes of the body, up to `keep`.
    pub body: Vec<u8>,
    keep: usize,
    /// The last chunk ended with a line feed (an event may end across chunks).
    after_newline: bool,
}

impl Tally {
    /// A tally keeping the first `keep` bytes of the body.
    pub fn new(keep: usize) -> Self {
        Tally {
            keep,
            ..Tally::default()
        }
    }

    /// The body's first bytes as kept, in the shape of [`body_excerpt`].
    pub fn excerpt(&self) -> Val {
        excerpt(self.bytes, &self.body)
    }

    /// A chunk went to the client.
    pub fn feed(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        self.first.get_or_insert_with(Instant::now);
        self.bytes += chunk.len() as u64;
        let room = self.keep.saturating_sub(self.body.len());
        self.body.extend_from_slice(&chunk[..room.min(chunk.len())]);
        // An event ends at a blank line: "\n\n" (a "\r\n\r\n" ends in "\n\r\n").
        // Only the line ends are visited: O(lines), not O(bytes).
        let mut prev_nl = self.after_newline;
        let mut from = 0;
        for at in memchr::memchr_iter(b'\n', chunk) {
            if chunk[from..at].iter().any(|&c| c != b'\r') {
                prev_nl = false;
            }
            if prev_nl {
                self.events += 1;
                if self.first_event.is_none() {
                    self.first_event = Some(Instant::now());
                }
                prev_nl = false;
            } else {
                prev_nl = true;
            }
            from = at + 1;
        }
        if chunk[from..].iter().any(|&c| c != b'\r') {
            prev_nl = false;
        }
        self.after_newline = prev_nl;
    }
}

/// A body for a trace: its first `limit` bytes as text (lossy UTF-8), with
/// a note when it was cut.
pub fn body_excerpt(body: &[u8], limit: usize) -> Val {
    excerpt(body.len() as u64, &body[..body.len().min(limit)])
}

/// `{bytes, truncated, text}` for a body of `total` bytes of which `kept`
/// are its first.
fn excerpt(total: u64, kept: &[u8]) -> Val {
    Val::Obj(vec![
        ("bytes", Val::from(total)),
        ("truncated", Val::Bool(total > kept.len() as u64)),
        (
            "text",
            Val::from(String::from_utf8_lossy(kept).into_owned()),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_become_json() {
        let v = Val::obj([
            ("a", Val::from(1u64)),
            ("b", Val::from("x")),
            ("c", Val::from(None::<u64>)),
            (
                "d",
                Val::Arr(vec![Val::Bool(true), Val::I64(-2), Val::F64(1.5)]),
            ),
            ("e", Val::Headers(vec![("api-key".into(), REDACTED.into())])),
            ("f", Val::F64(f64::NAN)),
            ("g", Val::from(String::from("y"))),
        ]);
        let expected = serde_json::json!({"a": 1, "b": "x", "c": null, "d": [true, -2, 1.5],
            "e": [{"name": "api-key", "value": "<redacted>"}], "f": null, "g": "y"});
        assert_eq!(v.to_json(), expected);
        // Serialized directly, the same JSON, keys in written order.
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), expected);
        assert!(text.starts_with(r#"{"a":1,"b":"x","c":null"#), "{text}");
    }

    #[test]
    fn sizes_grow_with_the_data() {
        let small = Val::from("static");
        let owned = Val::from("x".repeat(1000));
        assert!(owned.approx_bytes() >= small.approx_bytes() + 1000);
        let h = Val::Headers(vec![("n".repeat(100), "v".repeat(100))]);
        assert!(h.approx_bytes() >= 200);
        let mut map = http::HeaderMap::new();
        map.insert("x-long", "v".repeat(300).parse().unwrap());
        let m = Val::Map(map);
        assert!(m.approx_bytes() >= 306);
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), m.to_json());
        assert!(
            text.starts_with(r#"[{"name":"x-long","value":"vvv"#),
            "{text}"
        );
        let nested = Val::obj([("k", owned.clone())]);
        assert!(nested.approx_bytes() > owned.approx_bytes());
        let arr = Val::Arr(vec![owned.clone(), owned.clone()]);
        assert!(arr.approx_bytes() >= 2 * owned.approx_bytes());
        let mut r = Recorder::new(Instant::now());
        let empty = r.approx_bytes();
        r.add(Section::Inbound, "x", owned);
        assert!(r.approx_bytes() >= empty + 1000);
    }

    #[test]
    fn events_are_ordered_by_time_within_a_section() {
        let start = Instant::now();
        let mut r = Recorder::new(start);
        assert!(r.is_empty());
        r.add_at(
            Section::Backend,
            "late",
            start + Duration::from_millis(5),
            "b".into(),
        );
        r.add_at(
            Section::Backend,
            "early",
            start + Duration::from_millis(2),
            "a".into(),
        );
        r.add_at(
            Section::Inbound,
            "api-inspector",
            start + Duration::from_millis(1),
            Val::obj([("n", 1u64.into())]),
        );
        assert_eq!(r.len(), 3);
        assert!(r.has(Section::Backend, "early"));
        assert!(!r.has(Section::Inbound, "early"));
        assert!(!r.has(Section::Backend, "missing"));
        let t = r.to_trace("sluice", "id1");
        assert_eq!(t.trace_id, "id1");
        assert_eq!(t.service_name, "sluice");
        let b = &t.trace_entries.backend;
        assert_eq!(
            (b[0].source.as_str(), b[1].source.as_str()),
            ("early", "late")
        );
        assert_eq!(b[0].elapsed, "00:00:00.0020000");
        assert_eq!(
            t.trace_entries.inbound[0].data.to_json(),
            serde_json::json!({"n": 1})
        );
        // The timestamp is the wall-clock start plus the elapsed time.
        assert_eq!(
            b[1].timestamp,
            crate::format_timestamp(r.wall_start() + Duration::from_millis(5))
        );
    }

    #[test]
    fn a_trace_without_drops_has_no_note() {
        let start = Instant::now();
        let mut r = Recorder::new(start);
        r.add_at(
            Section::Outbound,
            "x",
            start + Duration::from_secs(2),
            Val::Null,
        );
        let t = r.to_trace("s", "i");
        assert_eq!(t.trace_entries.outbound.len(), 1);
        // With drops, the note is dated at the last kept entry.
        for _ in 0..MAX_EVENTS {
            r.add_at(
                Section::Inbound,
                "y",
                start + Duration::from_secs(1),
                Val::Null,
            );
        }
        let t = r.to_trace("s", "i");
        let note = t.trace_entries.outbound.last().unwrap();
        assert_eq!(note.source, "trace");
        assert_eq!(note.elapsed, "00:00:02.0000000");
        assert_eq!(
            note.timestamp,
            crate::format_timestamp(r.wall_start() + Duration::from_secs(2))
        );
    }

    #[test]
    fn a_trace_keeps_at_most_max_events() {
        let mut r = Recorder::new(Instant::now());
        for _ in 0..MAX_EVENTS + 3 {
            r.add(Section::Outbound, "x", Val::Null);
        }
        assert_eq!(r.len(), MAX_EVENTS);
        let t = r.to_trace("s", "i");
        assert_eq!(t.trace_entries.outbound.len(), MAX_EVENTS + 1);
        let last = t.trace_entries.outbound.last().unwrap();
        assert_eq!(last.source, "trace");
        assert!(
            last.data
                .to_json()
                .as_str()
                .unwrap()
                .starts_with("3 more entries")
        );
    }

    #[test]
    fn credentials_are_redacted() {
        let r = Redactor::new(
            [http::HeaderName::from_static("x-secret")],
            ["subscription-key".to_string()],
        );
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer eyJhbGciOi.secret".parse().unwrap());
        h.insert("api-key", "k-123".parse().unwrap());
        h.insert("apim-debug-authorization", "dbg".parse().unwrap());
        h.insert("x-secret", "s".parse().unwrap());
        h.insert("cookie", "a=b".parse().unwrap());
        h.insert("x-plain", "visible".parse().unwrap());
        let v = r.headers(&h).to_json();
        let text = v.to_string();
        for secret in ["eyJhbGciOi", "k-123", "dbg", "\"s\"", "a=b"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        let get = |name: &str| {
            v.as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .map(|e| e["value"].as_str().unwrap().to_string())
                .unwrap()
        };
        assert_eq!(get("authorization"), "Bearer <redacted>");
        assert_eq!(get("api-key"), REDACTED);
        assert_eq!(get("x-secret"), REDACTED);
        assert_eq!(get("x-plain"), "visible");
        // A hidden value without a scheme is hidden whole.
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "opaque".parse().unwrap());
        h.insert("x-secret", "two words".parse().unwrap());
        let v = r.headers(&h).to_json();
        assert_eq!(v[0]["value"], REDACTED);
        assert_eq!(v[1]["value"], REDACTED);
        assert!(r.hides(&http::HeaderName::from_static("set-cookie")));
        assert!(!r.hides(&http::HeaderName::from_static("x-plain")));
    }

    #[test]
    fn query_keys_are_redacted_in_urls() {
        let r = Redactor::new([], ["subscription-key".to_string()]);
        assert_eq!(r.url("/p", None), "/p");
        assert_eq!(
            r.url("/p", Some("api-version=1&Subscription-Key=abc&flag")),
            "/p?api-version=1&Subscription-Key=<redacted>&flag"
        );
        assert_eq!(r.url("/p", Some("subscription-key")), "/p?subscription-key");
        // Encoded names are the same parameter to the gateway, and here.
        assert_eq!(
            r.url(
                "/p",
                Some("subscription%2Dkey=abc&%73ubscription-key=d&x=%41")
            ),
            "/p?subscription%2Dkey=<redacted>&%73ubscription-key=<redacted>&x=%41"
        );
    }

    #[test]
    fn form_decoding() {
        assert_eq!(form_decode("%41%42"), "AB");
        assert_eq!(form_decode("%7a%7A"), "zz");
        assert_eq!(form_decode("a+b%20c"), "a b c");
        assert_eq!(form_decode("%2D-"), "--");
        // Bad or cut escapes stay as they are.
        assert_eq!(form_decode("%zz%4"), "%zz%4");
        assert_eq!(form_decode("%4g"), "%4g");
        assert_eq!(form_decode("x%"), "x%");
        assert_eq!(form_decode("x%4"), "x%4");
        assert_eq!(form_decode("%41"), "A");
        assert_eq!(form_decode("ab%41"), "abA");
        assert_eq!(form_decode("%ff"), "\u{fffd}");
        assert_eq!(form_decode(""), "");
    }

    #[test]
    fn sizes_are_counted_exactly() {
        let v = std::mem::size_of::<Val>();
        let w = std::mem::size_of::<usize>();
        assert_eq!(Val::Null.approx_bytes(), v);
        assert_eq!(Val::from("static").approx_bytes(), v);
        let owned = String::with_capacity(40) + "x";
        assert_eq!(Val::from(owned).approx_bytes(), v + 40);
        let obj = Val::obj([("a", Val::U64(1)), ("b", Val::Null)]);
        assert_eq!(
            obj.approx_bytes(),
            v + 2 * (v + std::mem::size_of::<&str>())
        );
        let arr = Val::Arr(vec![Val::Null, Val::Bool(true), Val::I64(-1)]);
        assert_eq!(arr.approx_bytes(), 4 * v);
        let mut map = http::HeaderMap::new();
        map.insert("x-a", "12345".parse().unwrap());
        map.insert("x-bb", "1".parse().unwrap());
        assert_eq!(
            Val::Map(map).approx_bytes(),
            v + (3 + 5 + 8 * w) + (4 + 1 + 8 * w)
        );
        let list = Val::Headers(vec![
            (String::with_capacity(10), String::with_capacity(20)),
            (String::with_capacity(3), String::with_capacity(0)),
        ]);
        let s = std::mem::size_of::<String>();
        assert_eq!(list.approx_bytes(), v + (30 + 2 * s) + (3 + 2 * s));
        let mut r = Recorder::new(Instant::now());
        assert!(r.is_empty());
        let base = r.approx_bytes();
        assert_eq!(base, std::mem::size_of::<Recorder>());
        r.add(Section::Inbound, "x", Val::Null);
        r.add(Section::Inbound, "y", Val::from(String::with_capacity(7)));
        assert!(!r.is_empty());
        assert_eq!(
            r.approx_bytes(),
            base + 2 * std::mem::size_of::<Event>() + 2 * v + 7
        );
    }

    #[test]
    fn a_tally_counts_events_across_chunks() {
        let mut t = Tally::new(8);
        t.feed(b"");
        assert!(t.first.is_none());
        t.feed(b"data: {}\n");
        assert!(t.first.is_some() && t.first_event.is_none());
        t.feed(b"\ndata: {\"a\":1}\n");
        assert_eq!(t.events, 1);
        assert!(t.first_event.unwrap() >= t.first.unwrap());
        t.feed(b"\ndata: [DONE]\r\n\r\n");
        assert_eq!(t.events, 3);
        assert!(t.first.is_some());
        assert_eq!(t.bytes, 41);
        assert_eq!(t.body, b"data: {}");
        assert_eq!(
            t.excerpt().to_json(),
            serde_json::json!({"bytes": 41, "truncated": true, "text": "data: {}"})
        );
        // JSON bodies have no blank lines.
        let mut j = Tally::new(0);
        j.feed(b"{\n  \"a\": 1\n}\n");
        assert_eq!(j.events, 0);
        assert!(j.body.is_empty());
        // A blank line split across chunks, with and without carriage returns.
        let mut k = Tally::new(0);
        for part in [
            &b"data: a\r"[..],
            b"\n",
            b"\r",
            b"\ndata: b\n",
            b"x\n",
            b"\n",
        ] {
            k.feed(part);
        }
        assert_eq!(k.events, 2);
        let mut l = Tally::new(0);
        l.feed(b"\n\n\n\n");
        assert_eq!(l.events, 2);
    }

    #[test]
    fn bodies_are_cut_at_the_limit() {
        assert_eq!(
            body_excerpt(b"hello", 3).to_json(),
            serde_json::json!({"bytes": 5, "truncated": true, "text": "hel"})
        );
        assert_eq!(
            body_excerpt(b"hey", 3).to_json(),
            serde_json::json!({"bytes": 3, "truncated": false, "text": "hey"})
        );
        assert_eq!(
            body_excerpt(b"hi", 3).to_json(),
            serde_json::json!({"bytes": 2, "truncated": false, "text": "hi"})
        );
    }
}
