//! Request traces in the shape APIM's `listTrace` returns, and request ids.
//!
//! A trace is `{serviceName, traceId, traceEntries{inbound, backend, outbound,
//! on-error}}`; each entry is `{source, timestamp, elapsed, data}` with the
//! timestamp in ISO-8601 UTC (7 fraction digits) and `elapsed` as a .NET
//! TimeSpan `hh:mm:ss.fffffff` since the gateway received the request.
//! [`record`] keeps what a traced request did while it runs; [`store`] keeps
//! finished traces for `listTrace`; [`summary`] keeps one line per request.
//! The model and its wire formats live here so every crate agrees on them.

pub mod credentials;
pub mod record;
pub mod store;
pub mod summary;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use time::UtcDateTime;
use uuid::Uuid;

/// The pipeline section an entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Inbound,
    Backend,
    Outbound,
    OnError,
}

/// One trace entry.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TraceEntry {
    pub source: String,
    pub timestamp: String,
    pub elapsed: String,
    /// A string or an object; objects keep their keys in the order the
    /// step wrote them (`message` first, as APIM's do).
    pub data: record::Val,
}

/// The entries of one request, by section.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TraceEntries {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inbound: Vec<TraceEntry>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backend: Vec<TraceEntry>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<TraceEntry>,
    #[serde(rename = "on-error", skip_serializing_if = "Vec::is_empty")]
    pub on_error: Vec<TraceEntry>,
}

/// A whole trace, as `listTrace` returns it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    pub service_name: String,
    pub trace_id: String,
    pub trace_entries: TraceEntries,
}

impl Trace {
    pub fn new(service_name: impl Into<String>, trace_id: impl Into<String>) -> Self {
        Trace {
            service_name: service_name.into(),
            trace_id: trace_id.into(),
            trace_entries: TraceEntries::default(),
        }
    }

    /// Append an entry; `elapsed` is measured from the request's start.
    pub fn push(
        &mut self,
        section: Section,
        source: &str,
        at: SystemTime,
        elapsed: Duration,
        data: record::Val,
    ) {
        let e = TraceEntry {
            source: source.to_string(),
            timestamp: format_timestamp(at),
            elapsed: format_elapsed(elapsed),
            data,
        };
        let list = match section {
            Section::Inbound => &mut self.trace_entries.inbound,
            Section::Backend => &mut self.trace_entries.backend,
            Section::Outbound => &mut self.trace_entries.outbound,
            Section::OnError => &mut self.trace_entries.on_error,
        };
        list.push(e);
    }
}

/// .NET TimeSpan text: `hh:mm:ss.fffffff` (100 ns ticks); days as `d.hh:...`.
pub fn format_elapsed(d: Duration) -> String {
    let ticks = d.as_nanos() / 100;
    let frac = ticks % 10_000_000;
    let secs = (ticks / 10_000_000) as u64;
    let (days, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if days > 0 {
        format!("{days}.{h:02}:{m:02}:{s:02}.{frac:07}")
    } else {
        format!("{h:02}:{m:02}:{s:02}.{frac:07}")
    }
}

/// ISO-8601 UTC with 7 fraction digits and `Z`, e.g. `2024-06-09T22:03:57.2767400Z`. Times before 1970 print
/// as the epoch, times past 9999 as the calendar's last instant.
pub fn format_timestamp(t: SystemTime) -> String {
    let nanos = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let t = i128::try_from(nanos)
        .ok()
        .and_then(|n| UtcDateTime::from_unix_timestamp_nanos(n).ok())
        .unwrap_or(UtcDateTime::MAX);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond() / 100
    )
}

/// A new random request id in GUID form (`8-4-4-4-12` lowercase hex, version 4).
pub fn new_request_id() -> String {
    Uuid::new_v4().to_string()
}

/// A new trace id (`Apim-Trace-Id`): 32 lowercase hex characters, as APIM's
/// look.
pub fn new_trace_id() -> String {
    Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elapsed_is_a_dotnet_timespan() {
        assert_eq!(
            format_elapsed(Duration::from_nanos(258_917_400)),
            "00:00:00.2589174"
        );
        assert_eq!(
            format_elapsed(Duration::from_secs(3723)),
            "01:02:03.0000000"
        );
        assert_eq!(
            format_elapsed(Duration::from_secs(90_000)),
            "1.01:00:00.0000000"
        );
    }

    #[test]
    fn timestamps_are_iso_utc() {
        // 2024-06-09T22:03:57.27674Z, the sample trace's first entry.
        let t = UNIX_EPOCH + Duration::new(1_717_970_637, 276_740_000);
        assert_eq!(format_timestamp(t), "2024-06-09T22:03:57.2767400Z");
        assert_eq!(format_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.0000000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(format_timestamp(leap).starts_with("2000-02-29T"));
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(format_timestamp(before), "1970-01-01T00:00:00.0000000Z");
        // 253_402_300_800 s is 10000-01-01, past the calendar.
        let last = UNIX_EPOCH + Duration::new(253_402_300_799, 999_999_999);
        assert_eq!(format_timestamp(last), "9999-12-31T23:59:59.9999999Z");
        let after = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(format_timestamp(after), "9999-12-31T23:59:59.9999999Z");
    }

    #[test]
    fn trace_serialises_like_list_trace() {
        let mut t = Trace::new("sluice", "abc");
        t.push(
            Section::Inbound,
            "api-inspector",
            UNIX_EPOCH,
            Duration::ZERO,
            record::Val::obj([("request", record::Val::obj([])), ("b", 1u64.into())]),
        );
        t.push(
            Section::OnError,
            "forward-request",
            UNIX_EPOCH,
            Duration::ZERO,
            "x".into(),
        );
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["serviceName"], "sluice");
        assert_eq!(v["traceId"], "abc");
        assert_eq!(v["traceEntries"]["inbound"][0]["source"], "api-inspector");
        assert_eq!(v["traceEntries"]["on-error"][0]["data"], "x");
        assert!(v["traceEntries"].get("backend").is_none());
        // Keys stay in the order they were written.
        let text = serde_json::to_string(&t).unwrap();
        assert!(text.contains(r#""data":{"request":{},"b":1}"#), "{text}");
    }

    #[test]
    fn trace_ids_are_32_hex() {
        let id = new_trace_id();
        assert_eq!(id.len(), 32);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
        assert_ne!(id, new_trace_id());
    }

    #[test]
    fn request_ids_are_guids() {
        let id = new_request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert!(
            id.chars().enumerate().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
            }),
            "{id}"
        );
        assert_ne!(id, new_request_id());
    }
}
