//! One-line summaries of every request, kept in a bounded ring for the management API.
//!
//! Every request, traced or not, pushes one [`Summary`] when it ends, so
//! [`SummaryRing::push`] sits on the hot path. The ring is a fixed array of slots, each
//! behind its own small lock, and an atomic counter hands out the next slot: two writers
//! only meet when they land on the same slot, which needs the ring to wrap around between
//! them. Readers walk back from the newest slot and copy what matches a [`SummaryFilter`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Method;
use serde_json::{Value, json};
use time::{Date, Month, Time, UtcDateTime};

use crate::credentials::parse_iso_duration;
use crate::format_timestamp;

/// What one request did, in brief.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// When the request arrived (wall clock).
    pub at: SystemTime,
    /// The API's name.
    pub api: Arc<str>,
    /// The request's method.
    pub method: Method,
    /// The request's path, never with the query string.
    pub path: Box<str>,
    /// The subscription that made the request, if any.
    pub subscription: Option<Arc<str>>,
    /// The deployment asked for, if the API has deployments.
    pub deployment: Option<Box<str>>,
    /// The backend that answered (or was tried last).
    pub backend: Option<Arc<str>>,
    /// The region of that backend.
    pub region: Option<Arc<str>>,
    /// The status sent to the client; 0 when none was (the client left first).
    pub status: u16,
    /// Prompt tokens, when known.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens, when known.
    pub completion_tokens: Option<u64>,
    /// Total tokens, when known.
    pub total_tokens: Option<u64>,
    /// From arrival to the end of the response.
    pub latency: Duration,
    /// Whether the response was streamed.
    pub stream: bool,
    /// How many backend attempts were made.
    pub attempts: u8,
    /// The trace id, when the request was traced.
    pub trace_id: Option<Box<str>>,
}

/// One slot of the ring: the summary stored there and the stamp of the push that stored
/// it (its position in push order plus one; zero while the slot is empty).
#[derive(Default)]
struct Slot {
    stamp: u64,
    summary: Option<Summary>,
}

/// A bounded ring of the latest request summaries, safe to push to from every request.
pub struct SummaryRing {
    slots: Box<[Mutex<Slot>]>,
    /// How many pushes have claimed a slot so far.
    next: AtomicU64,
}

impl std::fmt::Debug for SummaryRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SummaryRing")
            .field("capacity", &self.capacity())
            .field("pushed", &self.next.load(Ordering::Relaxed))
            .finish()
    }
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    // A slot is a plain value, whole after any panic, so poisoning is ignored rather than
    // spread to the request path.
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SummaryRing {
    /// A ring that keeps the latest `capacity` summaries; 0 disables it.
    pub fn new(capacity: usize) -> Self {
        SummaryRing {
            slots: (0..capacity).map(|_| Mutex::default()).collect(),
            next: AtomicU64::new(0),
        }
    }

    /// How many summaries the ring keeps.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Adds a summary, replacing the oldest when the ring is full. Does nothing when the
    /// ring is disabled.
    pub fn push(&self, s: Summary) {
        let len = self.slots.len() as u64;
        if len == 0 {
            return;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut slot = lock(&self.slots[(n % len) as usize]);
        // A writer that stalled until the ring came round again must not overwrite the
        // newer summary now in its slot.
        if slot.stamp > n {
            return;
        }
        slot.stamp = n + 1;
        let old = slot.summary.replace(s);
        drop(slot);
        drop(old);
    }

    /// The summaries that match `filter`, newest first, at most `filter.limit` of them.
    pub fn list(&self, filter: &SummaryFilter) -> Vec<Summary> {
        let len = self.slots.len() as u64;
        let end = self.next.load(Ordering::Relaxed);
        let start = end.saturating_sub(len);
        let mut out = Vec::with_capacity(filter.limit.min(self.slots.len()));
        for n in (start..end).rev() {
            if out.len() >= filter.limit {
                break;
            }
            let slot = lock(&self.slots[(n % len) as usize]);
            // A different stamp means the push for `n` has not stored its summary yet, or
            // a newer one has already replaced it.
            if slot.stamp == n + 1
                && let Some(s) = &slot.summary
                && filter.matches(s)
            {
                out.push(s.clone());
            }
        }
        out
    }
}

/// A status condition of a [`SummaryFilter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatch {
    /// Exactly this status (0 for requests that got no answer).
    Exact(u16),
    /// Any status of this class: 4 for 4xx, 5 for 5xx.
    Class(u8),
}

impl StatusMatch {
    /// Whether `status` meets the condition.
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusMatch::Exact(want) => status == want,
            StatusMatch::Class(class) => status / 100 == u16::from(class),
        }
    }
}

/// The `limit` of a [`SummaryFilter`] when the query gives none.
pub const DEFAULT_LIMIT: usize = 100;
/// The largest `limit` a query may ask for.
pub const MAX_LIMIT: usize = 1000;

/// Which summaries to list. Each condition left `None` lets every summary through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryFilter {
    /// Only this subscription (exact, case-sensitive).
    pub subscription: Option<String>,
    /// Only this deployment (exact, case-sensitive).
    pub deployment: Option<String>,
    /// Only this backend (exact, case-sensitive).
    pub backend: Option<String>,
    /// Only this API (exact, case-sensitive).
    pub api: Option<String>,
    /// Only these statuses.
    pub status: Option<StatusMatch>,
    /// Only requests that arrived at or after this time.
    pub since: Option<SystemTime>,
    /// Only traced requests (`true`) or only untraced ones (`false`).
    pub traced: Option<bool>,
    /// At most this many summaries.
    pub limit: usize,
}

impl Default for SummaryFilter {
    /// No conditions, and the default limit.
    fn default() -> Self {
        SummaryFilter {
            subscription: None,
            deployment: None,
            backend: None,
            api: None,
            status: None,
            since: None,
            traced: None,
            limit: DEFAULT_LIMIT,
        }
    }
}

/// The query parameters [`SummaryFilter::parse`] knows.
const PARAMETERS: [&str; 8] = [
    "subscription",
    "deployment",
    "backend",
    "api",
    "status",
    "since",
    "traced",
    "limit",
];

/// Whether a name condition lets `have` through.
fn name_matches(want: &Option<String>, have: Option<&str>) -> bool {
    want.as_deref().is_none_or(|w| have == Some(w))
}

impl SummaryFilter {
    /// Whether `s` meets every condition (the limit aside).
    pub fn matches(&self, s: &Summary) -> bool {
        name_matches(&self.subscription, s.subscription.as_deref())
            && name_matches(&self.deployment, s.deployment.as_deref())
            && name_matches(&self.backend, s.backend.as_deref())
            && name_matches(&self.api, Some(&s.api))
            && self.status.is_none_or(|m| m.matches(s.status))
            && self.since.is_none_or(|since| s.at >= since)
            && self.traced.is_none_or(|t| t == s.trace_id.is_some())
    }

    /// Reads a filter from a URL query string such as
    /// `subscription=team-a&status=5xx&since=PT15M&limit=50`.
    ///
    /// Names and values are percent-decoded, with `+` standing for a space. The parameters:
    /// `subscription`, `deployment`, `backend` and `api` (exact names); `status` (a status
    /// such as `429`, `0` for no answer, or a class such as `4xx` or `5XX`); `since` (an
    /// RFC 3339 UTC time such as `2026-12-01T10:00:00Z`, fraction optional, or an ISO-8601
    /// duration such as `PT15M` meaning that long before `now`); `traced` (`true` or
    /// `false`); `limit` (1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent). An empty value
    /// sets no condition. An unknown parameter, one given twice or a bad value is an
    /// error whose message names the parameter and the forms it accepts.
    pub fn parse(query: Option<&str>, now: SystemTime) -> Result<Self, String> {
        let mut filter = SummaryFilter::default();
        let mut seen = [false; PARAMETERS.len()];
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let Some(index) = PARAMETERS.iter().position(|p| *p == key) else {
                return Err(format!(
                    "unknown parameter '{key}': the parameters are {}",
                    PARAMETERS.join(", ")
                ));
            };
            if std::mem::replace(&mut seen[index], true) {
                return Err(format!("parameter '{key}' is given more than once"));
            }
            if value.is_empty() {
                continue;
            }
            let text = value.into_owned();
            match &*key {
                "subscription" => filter.subscription = Some(text),
                "deployment" => filter.deployment = Some(text),
                "backend" => filter.backend = Some(text),
                "api" => filter.api = Some(text),
                "status" => {
                    filter.status = Some(parse_status(&text).ok_or_else(|| {
                        format!(
                            "status '{text}' is not valid: give a status code from 100 to 599 \
                             such as 429, a class such as 4xx or 5xx, or 0 for requests that \
                             got no answer"
                        )
                    })?);
                }
                "since" => {
                    filter.since = Some(parse_since(&text, now).ok_or_else(|| {
                        format!(
                            "since '{text}' is not valid: give an RFC 3339 UTC time such as \
                             2026-12-01T10:00:00Z (fraction optional) or an ISO-8601 duration \
                             such as PT15M or P1D"
                        )
                    })?);
                }
                "traced" => {
                    filter.traced = Some(match &*text {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(format!(
                                "traced '{text}' is not valid: give true or false"
                            ));
                        }
                    });
                }
                // `limit`, the only parameter left.
                _ => {
                    filter.limit = text
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            format!(
                                "limit '{text}' is not valid: give a whole number from 1 to \
                                 {MAX_LIMIT}"
                            )
                        })?;
                }
            }
        }
        Ok(filter)
    }
}

/// `429`, `0`, or a class `4xx` / `4XX`.
fn parse_status(text: &str) -> Option<StatusMatch> {
    if text == "0" {
        return Some(StatusMatch::Exact(0));
    }
    let b = text.as_bytes();
    if b.len() != 3 || !(b'1'..=b'5').contains(&b[0]) {
        return None;
    }
    if b[1..].eq_ignore_ascii_case(b"xx") {
        return Some(StatusMatch::Class(b[0] - b'0'));
    }
    if b[1..].iter().all(u8::is_ascii_digit) {
        return text.parse().ok().map(StatusMatch::Exact);
    }
    None
}

/// An ISO-8601 duration before `now`, or an RFC 3339 UTC time.
fn parse_since(text: &str, now: SystemTime) -> Option<SystemTime> {
    if text.starts_with('P') {
        let ago = parse_duration(text)?;
        // Back before 1970 (or further than the clock goes) every summary is later, as
        // it is than the epoch.
        return Some(
            now.checked_sub(ago)
                .map_or(UNIX_EPOCH, |t| t.max(UNIX_EPOCH)),
        );
    }
    parse_utc_time(text)
}

/// [`parse_iso_duration`], refusing numbers so large that converting them would overflow.
fn parse_duration(text: &str) -> Option<Duration> {
    // At most 9 digits before any decimal point: 999_999_999 days, hours, minutes and
    // seconds together still fit a `Duration` easily. Fraction digits cannot overflow.
    let mut run = 0;
    let mut fraction = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            run += 1;
            if run > 9 && !fraction {
                return None;
            }
        } else {
            run = 0;
            fraction = c == '.';
        }
    }
    parse_iso_duration(text)
}

/// Takes `n` ASCII digits from the front of `text` as a number.
fn digits(text: &mut &[u8], n: usize) -> Option<u32> {
    if text.len() < n || !text[..n].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let (head, rest) = text.split_at(n);
    *text = rest;
    Some(head.iter().fold(0, |acc, d| acc * 10 + u32::from(d - b'0')))
}

/// Takes the byte `want` (any of them) from the front of `text`.
fn byte(text: &mut &[u8], want: &[u8]) -> Option<()> {
    let (first, rest) = text.split_first()?;
    want.contains(first).then(|| *text = rest)
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (the `T` and `Z` may be lowercase, and the `T` a
/// space, as RFC 3339 allows).
fn parse_utc_time(text: &str) -> Option<SystemTime> {
    let mut t = text.as_bytes();
    let year = digits(&mut t, 4)?;
    byte(&mut t, b"-")?;
    let month = digits(&mut t, 2)?;
    byte(&mut t, b"-")?;
    let day = digits(&mut t, 2)?;
    byte(&mut t, b"Tt ")?;
    let hour = digits(&mut t, 2)?;
    byte(&mut t, b":")?;
    let minute = digits(&mut t, 2)?;
    byte(&mut t, b":")?;
    let second = digits(&mut t, 2)?;
    let mut nanos = 0;
    if byte(&mut t, b".").is_some() {
        let count = t.iter().take_while(|c| c.is_ascii_digit()).count();
        if count == 0 {
            return None;
        }
        // Digits past the ninth are below a nanosecond and are dropped.
        for place in 0..9 {
            let d = t
                .get(place)
                .filter(|_| place < count)
                .map_or(0, |d| d - b'0');
            nanos = nanos * 10 + u32::from(d);
        }
        t = &t[count..];
    }
    byte(&mut t, b"Zz")?;
    if !t.is_empty() {
        return None;
    }
    let month = Month::try_from(u8::try_from(month).ok()?).ok()?;
    let date =
        Date::from_calendar_date(i32::try_from(year).ok()?, month, u8::try_from(day).ok()?).ok()?;
    let time = Time::from_hms_nano(
        u8::try_from(hour).ok()?,
        u8::try_from(minute).ok()?,
        u8::try_from(second).ok()?,
        nanos,
    )
    .ok()?;
    let at = UtcDateTime::new(date, time);
    match u64::try_from(at.unix_timestamp()) {
        Ok(secs) => UNIX_EPOCH.checked_add(Duration::new(secs, at.nanosecond())),
        // Times before 1970 come before every summary, as the epoch does.
        Err(_) => Some(UNIX_EPOCH),
    }
}

/// Milliseconds rounded to the microsecond.
fn latency_ms(d: Duration) -> f64 {
    ((d.as_nanos() + 500) / 1000) as f64 / 1000.0
}

/// The JSON the management API returns for one summary (camelCase names, `null` for
/// what is unknown, `latencyMs` in milliseconds to 3 decimals).
pub fn summary_json(s: &Summary) -> Value {
    json!({
        "time": format_timestamp(s.at),
        "api": &*s.api,
        "method": s.method.as_str(),
        "path": &*s.path,
        "subscription": s.subscription.as_deref(),
        "deployment": s.deployment.as_deref(),
        "backend": s.backend.as_deref(),
        "region": s.region.as_deref(),
        "status": s.status,
        "promptTokens": s.prompt_tokens,
        "completionTokens": s.completion_tokens,
        "totalTokens": s.total_tokens,
        "latencyMs": latency_ms(s.latency),
        "stream": s.stream,
        "attempts": s.attempts,
        "traceId": s.trace_id.as_deref(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-01T10:00:00Z.
    const DEC_1: u64 = 1_796_119_200;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn summary(n: u64) -> Summary {
        Summary {
            at: at(DEC_1 + n),
            api: "chat".into(),
            method: Method::POST,
            path: format!("/r/{n}").into(),
            subscription: None,
            deployment: None,
            backend: None,
            region: None,
            status: 200,
            prompt_tokens: None,
            completion_tokens: None,
            total_tokens: None,
            latency: Duration::from_millis(n),
            stream: false,
            attempts: 1,
            trace_id: None,
        }
    }

    fn paths(list: &[Summary]) -> Vec<&str> {
        list.iter().map(|s| &*s.path).collect()
    }

    fn all() -> SummaryFilter {
        SummaryFilter {
            limit: usize::MAX,
            ..SummaryFilter::default()
        }
    }

    fn parse(q: &str) -> Result<SummaryFilter, String> {
        SummaryFilter::parse(Some(q), at(DEC_1))
    }

    #[test]
    fn a_disabled_ring_keeps_nothing() {
        let ring = SummaryRing::new(0);
        assert_eq!(ring.capacity(), 0);
        ring.push(summary(1));
        assert!(ring.list(&all()).is_empty());
        assert!(format!("{ring:?}").contains("capacity: 0"));
    }

    #[test]
    fn the_ring_lists_newest_first_and_wraps_around() {
        let ring = SummaryRing::new(3);
        assert_eq!(ring.capacity(), 3);
        assert!(ring.list(&all()).is_empty());
        ring.push(summary(0));
        ring.push(summary(1));
        assert_eq!(paths(&ring.list(&all())), ["/r/1", "/r/0"]);
        for n in 2..8 {
            ring.push(summary(n));
        }
        assert_eq!(paths(&ring.list(&all())), ["/r/7", "/r/6", "/r/5"]);
        assert_eq!(ring.list(&all())[0], summary(7));
        let text = format!("{ring:?}");
        assert!(
            text.contains("capacity: 3") && text.contains("pushed: 8"),
            "{text}"
        );
    }

    #[test]
    fn the_limit_counts_matches_newest_first() {
        let ring = SummaryRing::new(10);
        for n in 0..6 {
            let mut s = summary(n);
            s.status = if n % 2 == 0 { 200 } else { 500 };
            ring.push(s);
        }
        let f = |limit| SummaryFilter { limit, ..all() };
        assert_eq!(paths(&ring.list(&f(2))), ["/r/5", "/r/4"]);
        assert!(ring.list(&f(0)).is_empty());
        let errors = SummaryFilter {
            status: Some(StatusMatch::Class(5)),
            limit: 2,
            ..all()
        };
        assert_eq!(paths(&ring.list(&errors)), ["/r/5", "/r/3"]);
    }

    #[test]
    fn a_claimed_slot_not_yet_written_is_skipped() {
        let ring = SummaryRing::new(4);
        ring.push(summary(0));
        ring.next.fetch_add(1, Ordering::Relaxed); // a writer claimed 1 and is still busy
        ring.push(summary(2));
        assert_eq!(paths(&ring.list(&all())), ["/r/2", "/r/0"]);
    }

    #[test]
    fn a_late_writer_does_not_overwrite_a_newer_summary() {
        let ring = SummaryRing::new(2);
        // A writer claims 0 and stalls while two more pushes come round to its slot.
        let stalled = ring.next.fetch_add(1, Ordering::Relaxed);
        ring.push(summary(1));
        ring.push(summary(2));
        let mut slot = lock(&ring.slots[stalled as usize]);
        assert_eq!(slot.stamp, 3);
        drop(slot);
        // Now it writes, as push does: nothing changes.
        ring.next.store(stalled, Ordering::Relaxed);
        ring.push(summary(0));
        ring.next.store(3, Ordering::Relaxed);
        slot = lock(&ring.slots[0]);
        assert_eq!(
            (slot.stamp, slot.summary.as_ref().map(|s| &*s.path)),
            (3, Some("/r/2"))
        );
        drop(slot);
        assert_eq!(paths(&ring.list(&all())), ["/r/2", "/r/1"]);
    }

    #[test]
    fn a_writer_in_its_own_turn_replaces_the_summary() {
        let ring = SummaryRing::new(1);
        ring.push(summary(0));
        ring.push(summary(1));
        let slot = lock(&ring.slots[0]);
        assert_eq!(slot.stamp, 2);
        assert_eq!(slot.summary.as_ref().map(|s| &*s.path), Some("/r/1"));
    }

    fn threaded(thread: u64, i: u64) -> Summary {
        let mut s = summary(thread * 1_000_000 + i);
        s.status = 200 + thread as u16;
        s.subscription = Some(format!("t{thread}").into());
        s.trace_id = Some(format!("{thread}-{i}").into());
        s
    }

    fn pushed_from_threads(capacity: usize, threads: u64, each: u64) -> Vec<Summary> {
        let ring = Arc::new(SummaryRing::new(capacity));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let ring = Arc::clone(&ring);
                std::thread::spawn(move || {
                    for i in 0..each {
                        ring.push(threaded(t, i));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        ring.list(&all())
    }

    /// Every entry whole, and each thread's entries newest first.
    fn check_threaded(list: &[Summary]) {
        let mut last: HashMap<u64, u64> = HashMap::new();
        for s in list {
            let n: u64 = s.path[3..].parse().unwrap();
            let (thread, i) = (n / 1_000_000, n % 1_000_000);
            assert_eq!(*s, threaded(thread, i), "torn entry");
            if let Some(prev) = last.insert(thread, i) {
                assert!(i < prev, "thread {thread}: {i} listed after {prev}");
            }
        }
    }

    use std::collections::HashMap;

    #[test]
    fn concurrent_pushes_lose_nothing_that_fits() {
        let list = pushed_from_threads(8 * 500, 8, 500);
        assert_eq!(list.len(), 8 * 500);
        check_threaded(&list);
        let mut ids: Vec<_> = list.iter().map(|s| s.trace_id.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 8 * 500);
    }

    #[test]
    fn concurrent_pushes_keep_the_latest_capacity() {
        let list = pushed_from_threads(64, 8, 2000);
        assert_eq!(list.len(), 64);
        check_threaded(&list);
    }

    #[test]
    fn status_matches() {
        assert!(StatusMatch::Exact(429).matches(429));
        assert!(!StatusMatch::Exact(429).matches(430));
        assert!(StatusMatch::Exact(0).matches(0));
        assert!(StatusMatch::Class(4).matches(400));
        assert!(StatusMatch::Class(4).matches(499));
        assert!(!StatusMatch::Class(4).matches(399));
        assert!(!StatusMatch::Class(4).matches(500));
        assert!(!StatusMatch::Class(5).matches(0));
    }

    #[test]
    fn every_filter_field_selects() {
        let mut full = summary(10);
        full.subscription = Some("team-a".into());
        full.deployment = Some("gpt-4o".into());
        full.backend = Some("east".into());
        full.region = Some("East US".into());
        full.status = 429;
        full.trace_id = Some("t1".into());
        let bare = summary(5);
        let f = all();
        assert!(f.matches(&full) && f.matches(&bare));

        type Field = fn(&mut SummaryFilter) -> &mut Option<String>;
        let names: [(Field, &str); 4] = [
            (|f| &mut f.subscription, "team-a"),
            (|f| &mut f.deployment, "gpt-4o"),
            (|f| &mut f.backend, "east"),
            (|f| &mut f.api, "chat"),
        ];
        for (field, value) in names {
            let mut f = all();
            *field(&mut f) = Some(value.to_string());
            assert!(f.matches(&full), "{f:?}");
            *field(&mut f) = Some(value.to_uppercase());
            assert!(!f.matches(&full), "case-sensitive: {f:?}");
            *field(&mut f) = Some(format!("{value}x"));
            assert!(!f.matches(&full), "{f:?}");
            // Optional names are absent from the bare summary; its api is "chat".
            *field(&mut f) = Some(value.to_string());
            assert_eq!(f.matches(&bare), value == "chat", "{f:?}");
        }

        let status = |m| SummaryFilter {
            status: Some(m),
            ..all()
        };
        assert!(status(StatusMatch::Exact(429)).matches(&full));
        assert!(!status(StatusMatch::Exact(429)).matches(&bare));
        assert!(status(StatusMatch::Class(4)).matches(&full));
        assert!(status(StatusMatch::Class(2)).matches(&bare));

        let since = |secs| SummaryFilter {
            since: Some(at(secs)),
            ..all()
        };
        assert!(since(DEC_1 + 10).matches(&full)); // at == since is kept
        assert!(!since(DEC_1 + 11).matches(&full));
        assert!(since(DEC_1 + 9).matches(&full));
        assert!(!since(DEC_1 + 10).matches(&bare));

        let traced = |t| SummaryFilter {
            traced: Some(t),
            ..all()
        };
        assert!(traced(true).matches(&full));
        assert!(!traced(true).matches(&bare));
        assert!(traced(false).matches(&bare));
        assert!(!traced(false).matches(&full));

        // Conditions combine.
        let both = SummaryFilter {
            api: Some("chat".into()),
            status: Some(StatusMatch::Class(2)),
            ..all()
        };
        assert!(both.matches(&bare) && !both.matches(&full));

        let ring = SummaryRing::new(4);
        ring.push(full.clone());
        ring.push(bare.clone());
        assert_eq!(ring.list(&traced(true)), [full]);
        assert_eq!(ring.list(&traced(false)), [bare]);
    }

    #[test]
    fn no_query_is_no_filter() {
        let none = SummaryFilter::parse(None, at(DEC_1)).unwrap();
        assert_eq!(none, SummaryFilter::default());
        assert_eq!(none.limit, 100);
        assert_eq!(
            (none.subscription, none.status, none.since, none.traced),
            (None, None, None, None)
        );
        assert_eq!(parse("").unwrap(), SummaryFilter::default());
        assert_eq!(parse("&&").unwrap(), SummaryFilter::default());
        // Empty values set no condition.
        let empty = "subscription=&deployment=&backend=&api=&status=&since=&traced=&limit";
        assert_eq!(parse(empty).unwrap(), SummaryFilter::default());
    }

    #[test]
    fn a_full_query() {
        let f = parse(
            "subscription=team-a&deployment=gpt-4o&backend=east&api=chat&status=5xx\
             &since=PT15M&traced=true&limit=50",
        )
        .unwrap();
        assert_eq!(
            f,
            SummaryFilter {
                subscription: Some("team-a".into()),
                deployment: Some("gpt-4o".into()),
                backend: Some("east".into()),
                api: Some("chat".into()),
                status: Some(StatusMatch::Class(5)),
                since: Some(at(DEC_1 - 900)),
                traced: Some(true),
                limit: 50,
            }
        );
        assert_eq!(parse("traced=false").unwrap().traced, Some(false));
    }

    #[test]
    fn names_and_values_are_percent_decoded() {
        let f = parse("subscription=team%20a&api=my+api&sub%73cription=x");
        assert_eq!(
            f.unwrap_err(),
            "parameter 'subscription' is given more than once"
        );
        let f = parse("subscription=team%2Da%26b&api=my+api&back%65nd=%E2%82%AC").unwrap();
        assert_eq!(f.subscription.as_deref(), Some("team-a&b"));
        assert_eq!(f.api.as_deref(), Some("my api"));
        assert_eq!(f.backend.as_deref(), Some("€"));
        assert_eq!(
            parse("status=5%78x").unwrap().status,
            Some(StatusMatch::Class(5))
        );
        assert_eq!(
            parse("since=2026-12-01+10:00:00Z").unwrap().since,
            Some(at(DEC_1))
        );
    }

    #[test]
    fn unknown_and_repeated_parameters_are_errors() {
        let e = parse("subscription=a&colour=blue").unwrap_err();
        assert_eq!(
            e,
            "unknown parameter 'colour': the parameters are subscription, deployment, \
             backend, api, status, since, traced, limit"
        );
        assert!(parse("Status=500").unwrap_err().contains("'Status'"));
        assert!(parse("=5").unwrap_err().contains("unknown parameter ''"));
        assert!(parse("colour=").unwrap_err().contains("'colour'"));
        assert_eq!(
            parse("limit=&limit=5").unwrap_err(),
            "parameter 'limit' is given more than once"
        );
        for (i, name) in PARAMETERS.iter().enumerate() {
            let value = ["a", "b", "c", "d", "404", "PT1M", "true", "5"][i];
            let q = format!("{name}={value}&{name}={value}");
            let e = parse(&q).unwrap_err();
            assert!(e.contains(&format!("'{name}'")), "{e}");
        }
    }

    #[test]
    fn status_values() {
        let ok = |v: &str| parse(&format!("status={v}")).unwrap().status.unwrap();
        assert_eq!(ok("429"), StatusMatch::Exact(429));
        assert_eq!(ok("100"), StatusMatch::Exact(100));
        assert_eq!(ok("599"), StatusMatch::Exact(599));
        assert_eq!(ok("0"), StatusMatch::Exact(0));
        assert_eq!(ok("1xx"), StatusMatch::Class(1));
        assert_eq!(ok("4xx"), StatusMatch::Class(4));
        assert_eq!(ok("5XX"), StatusMatch::Class(5));
        assert_eq!(ok("2xX"), StatusMatch::Class(2));
        for bad in [
            "600", "099", "99", "42", "1000", "4x", "4xy", "6xx", "0xx", "xxx", "abc", "00", "-1",
            "+5xx", "4 x", "40x", "4x0", " 404", "404 ", "٤٠٤",
        ] {
            let e = parse(&format!("status={}", bad.replace('+', "%2B"))).expect_err(bad);
            assert!(
                e.starts_with(&format!("status '{bad}' is not valid")),
                "{e}"
            );
            assert!(e.contains("429") && e.contains("5xx"), "{e}");
        }
    }

    #[test]
    fn since_as_a_time() {
        let since = |v: &str| parse(&format!("since={v}")).map(|f| f.since.unwrap());
        assert_eq!(since("2026-12-01T10:00:00Z").unwrap(), at(DEC_1));
        assert_eq!(since("2026-12-01t10:00:00z").unwrap(), at(DEC_1));
        assert_eq!(since("2026-12-01%2010:00:00Z").unwrap(), at(DEC_1));
        assert_eq!(
            since("2026-12-01T10:00:00.5Z").unwrap(),
            at(DEC_1) + Duration::from_millis(500)
        );
        assert_eq!(
            since("2026-12-01T10:00:00.123456789999Z").unwrap(),
            at(DEC_1) + Duration::from_nanos(123_456_789)
        );
        assert_eq!(
            since("2026-12-01T10:00:00.000000001Z").unwrap(),
            at(DEC_1) + Duration::from_nanos(1)
        );
        assert_eq!(since("2024-02-29T23:59:59Z").unwrap(), at(1_709_251_199));
        assert_eq!(since("9999-12-31T23:59:59Z").unwrap(), at(253_402_300_799));
        assert_eq!(since("1970-01-01T00:00:00Z").unwrap(), UNIX_EPOCH);
        assert_eq!(since("1969-12-31T23:59:59.9Z").unwrap(), UNIX_EPOCH);
        assert_eq!(since("0000-01-01T00:00:00Z").unwrap(), UNIX_EPOCH);
        for bad in [
            "2026-12-01T10:00:00",
            "2026-12-01T10:00:00+00:00",
            "2026-12-01T10:00:00.Z",
            "2026-12-01T10:00:00ZZ",
            "2026-12-01T10:00Z",
            "2026-12-01",
            "26-12-01T10:00:00Z",
            "2026-1-01T10:00:00Z",
            "2026/12/01T10:00:00Z",
            "2026-12/01T10:00:00Z",
            "2026-12-01X10:00:00Z",
            "2026-12-01T10-00:00Z",
            "2026-12-01T10:00-00Z",
            "2026-13-01T10:00:00Z",
            "2026-00-01T10:00:00Z",
            "2026-02-29T10:00:00Z",
            "2026-12-32T10:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T10:60:00Z",
            "2026-12-01T10:00:60Z",
            "2026-12-01T10:00:0aZ",
            "2026-12-01T10:00:00.5",
            "2026-12-01T10:00:00.5ZX",
            "-026-12-01T10:00:00Z",
            "yesterday",
            "now",
        ] {
            let e = since(&bad.replace('+', "%2B")).expect_err(bad);
            assert!(e.starts_with(&format!("since '{bad}' is not valid")), "{e}");
            assert!(
                e.contains("2026-12-01T10:00:00Z") && e.contains("PT15M"),
                "{e}"
            );
        }
    }

    #[test]
    fn since_as_a_duration() {
        let since = |v: &str| parse(&format!("since={v}")).map(|f| f.since.unwrap());
        assert_eq!(since("PT15M").unwrap(), at(DEC_1 - 900));
        assert_eq!(since("P1D").unwrap(), at(DEC_1 - 86_400));
        assert_eq!(
            since("PT0.5S").unwrap(),
            at(DEC_1) - Duration::from_millis(500)
        );
        assert_eq!(since("PT999999999S").unwrap(), at(DEC_1 - 999_999_999));
        assert_eq!(
            since("PT1.1234567891S").unwrap(),
            at(DEC_1) - Duration::from_secs_f64(1.123_456_789_1)
        );
        // Further back than the clock goes.
        assert_eq!(since("P999999999D").unwrap(), UNIX_EPOCH);
        assert_eq!(
            since("P999999999DT999999999H999999999M999999999S").unwrap(),
            UNIX_EPOCH
        );
        let early = SummaryFilter::parse(Some("since=PT1M"), at(10)).unwrap();
        assert_eq!(early.since, Some(UNIX_EPOCH));
        // Numbers too large to convert are refused, not a panic.
        for bad in [
            "P",
            "PT",
            "P1Y",
            "PT15",
            "P1000000000D",
            "PT99999999999999999999S",
            "PT1.5.5S",
            "pt15m",
        ] {
            let e = since(bad).expect_err(bad);
            assert!(e.starts_with(&format!("since '{bad}' is not valid")), "{e}");
        }
    }

    #[test]
    fn the_duration_guard_counts_digit_runs() {
        assert_eq!(
            parse_duration("PT123456789S"),
            Some(Duration::from_secs(123_456_789))
        );
        assert_eq!(parse_duration("PT1234567890S"), None);
        assert_eq!(parse_duration("P1DT1234567890S"), None);
        assert_eq!(
            parse_duration("PT123456789H123456789M"),
            Some(Duration::from_secs(123_456_789 * 3660))
        );
        // Only digits before a decimal point count; the fraction may be long.
        assert!(parse_duration("PT1.0000000001S").is_some());
        assert!(parse_duration("PT0.5S1234567890").is_none());
        assert_eq!(parse_duration("PT0.5H1234567890M"), None);
    }

    #[test]
    fn digits_take_exactly_what_they_need() {
        let mut t: &[u8] = b"12";
        assert_eq!(digits(&mut t, 2), Some(12));
        assert!(t.is_empty());
        let mut t: &[u8] = b"1";
        assert_eq!(digits(&mut t, 2), None);
        let mut t: &[u8] = b"0987x";
        assert_eq!(digits(&mut t, 4), Some(987));
        assert_eq!(t, b"x");
    }

    #[test]
    fn traced_values() {
        for bad in ["yes", "TRUE", "1", "False"] {
            let e = parse(&format!("traced={bad}")).unwrap_err();
            assert_eq!(
                e,
                format!("traced '{bad}' is not valid: give true or false")
            );
        }
    }

    #[test]
    fn limit_values() {
        let limit = |v: &str| parse(&format!("limit={v}")).map(|f| f.limit);
        assert_eq!(limit("1"), Ok(1));
        assert_eq!(limit("1000"), Ok(1000));
        assert_eq!(limit("50"), Ok(50));
        for bad in [
            "0",
            "1001",
            "-1",
            "abc",
            "%205",
            "5.0",
            "99999999999999999999999",
        ] {
            let e = parse(&format!("limit={bad}")).expect_err(bad);
            assert!(
                e.starts_with("limit '") && e.ends_with("from 1 to 1000"),
                "{e}"
            );
        }
    }

    #[test]
    fn json_shape() {
        let mut s = summary(0);
        s.at = UNIX_EPOCH + Duration::new(1_717_970_637, 276_740_000);
        s.latency = Duration::from_nanos(12_345_499);
        let v = summary_json(&s);
        assert_eq!(
            v,
            json!({
                "time": "2024-06-09T22:03:57.2767400Z",
                "api": "chat",
                "method": "POST",
                "path": "/r/0",
                "subscription": null,
                "deployment": null,
                "backend": null,
                "region": null,
                "status": 200,
                "promptTokens": null,
                "completionTokens": null,
                "totalTokens": null,
                "latencyMs": 12.345,
                "stream": false,
                "attempts": 1,
                "traceId": null,
            })
        );
        s.method = Method::from_bytes(b"PURGE").unwrap();
        s.subscription = Some("team-a".into());
        s.deployment = Some("gpt-4o".into());
        s.backend = Some("east".into());
        s.region = Some("East US".into());
        s.status = 0;
        s.prompt_tokens = Some(10);
        s.completion_tokens = Some(5);
        s.total_tokens = Some(15);
        s.latency = Duration::from_nanos(12_345_500);
        s.stream = true;
        s.attempts = 3;
        s.trace_id = Some("t-1".into());
        let v = summary_json(&s);
        assert_eq!(v["method"], "PURGE");
        assert_eq!(v["subscription"], "team-a");
        assert_eq!(v["deployment"], "gpt-4o");
        assert_eq!(v["backend"], "east");
        assert_eq!(v["region"], "East US");
        assert_eq!(v["status"], 0);
        assert_eq!(v["promptTokens"], 10);
        assert_eq!(v["completionTokens"], 5);
        assert_eq!(v["totalTokens"], 15);
        assert_eq!(v["latencyMs"], 12.346);
        assert_eq!(v["stream"], true);
        assert_eq!(v["attempts"], 3);
        assert_eq!(v["traceId"], "t-1");
        assert_eq!(v.as_object().unwrap().len(), 16);
        // Whole and tiny latencies.
        assert_eq!(latency_ms(Duration::from_secs(2)), 2000.0);
        assert_eq!(latency_ms(Duration::from_nanos(499)), 0.0);
        assert_eq!(latency_ms(Duration::from_nanos(500)), 0.001);
    }
}
