//! Direct edits of the heads pingora hands the gateway's hooks.
//!
//! pingora's `insert_header` and `remove_header` keep two maps in step: the
//! `http` header map, and a second one holding each name as it was written
//! (its case). Every insert parses the name again, and a name outside
//! `http`'s standard set is copied to the heap, twice. A head that pingora
//! parsed is also built with no spare room, so the first header the gateway
//! adds regrows both maps. Together that was about 5,000 instructions of
//! every proxied request (callgrind, key check only).
//!
//! The gateway instead takes the head apart (`http`'s `Parts`, which pingora
//! converts to and from for free), edits the header map with names built
//! once, after one `reserve`, and puts it back. The one thing lost is the
//! record of case: the head is written with `http`'s standard names in their
//! usual capitals (`Content-Type`) and any other name in lower case, as HTTP/2
//! always does and as Envoy does by default. Header names are
//! case-insensitive (RFC 9110, section 5.1); every client and backend the
//! gateway serves reads them so.
//!
//! Everything else of the head is kept: status, reason phrase, version,
//! method, URI, a request-target that the URI does not reproduce (absolute
//! form, or bytes that are not UTF-8), extensions, and HTTP/2's end-of-stream
//! flag.

use http::HeaderMap;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::{Error, ErrorType, Result};

/// Edits a response head's headers in place, with room for `room` more.
pub(crate) fn edit_response<R>(
    head: &mut ResponseHeader,
    room: usize,
    edit: impl FnOnce(&mut HeaderMap) -> R,
) -> R {
    // pingora answers the status's standard phrase when it keeps none.
    let reason = head
        .get_reason_phrase()
        .filter(|r| Some(*r) != head.status.canonical_reason())
        .map(str::to_owned);
    let mut parts: http::response::Parts =
        std::mem::replace(head, ResponseHeader::from(empty_response())).into();
    parts.headers.reserve(room);
    let out = edit(&mut parts.headers);
    *head = ResponseHeader::from(parts);
    if reason.is_some() {
        // Never fails: it only stores the phrase.
        let _ = head.set_reason_phrase(reason.as_deref());
    }
    out
}

/// Edits a request head's headers in place, with room for `room` more.
pub(crate) fn edit_request<R>(
    head: &mut RequestHeader,
    room: usize,
    edit: impl FnOnce(&mut HeaderMap) -> R,
) -> Result<R> {
    // The target is kept apart from the URI only when the URI does not
    // reproduce it; then it goes back as it was.
    let from_uri = head.raw_path_is_utf8()
        && head
            .uri
            .path_and_query()
            .is_some_and(|pq| std::ptr::eq(pq.as_str().as_bytes(), head.raw_path()));
    let raw_target = (!from_uri).then(|| head.raw_path().to_vec());
    let end_stream = head.send_end_stream();
    let mut parts: http::request::Parts =
        std::mem::replace(head, RequestHeader::from(empty_request())).into();
    parts.headers.reserve(room);
    let out = edit(&mut parts.headers);
    *head = RequestHeader::from(parts);
    if let Some(raw) = raw_target {
        head.set_raw_path(&raw).map_err(|e| {
            Error::because(ErrorType::InternalError, "restoring the request target", e)
        })?;
    }
    if let Some(end) = end_stream {
        head.set_send_end_stream(end);
    }
    Ok(out)
}

/// The lengths a set of header names has, as a bit mask: a name of any
/// other length is none of them, which a walk over a head's names can tell
/// without comparing the name with each. Lengths of 63 and more share the
/// last bit (such a name is always compared).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct NameLengths(u64);

impl NameLengths {
    pub(crate) fn of<'a>(names: impl IntoIterator<Item = &'a http::HeaderName>) -> Self {
        NameLengths(names.into_iter().fold(0, |m, n| m | Self::bit(n)))
    }

    fn bit(name: &http::HeaderName) -> u64 {
        1 << name.as_str().len().min(63)
    }

    /// Whether `name` may be one of the set (false: it surely is not).
    pub(crate) fn may_hold(self, name: &http::HeaderName) -> bool {
        self.0 & Self::bit(name) != 0
    }
}

/// Placeholders, allocation-free: an empty header map reserves nothing.
fn empty_response() -> http::response::Parts {
    http::Response::new(()).into_parts().0
}

fn empty_request() -> http::request::Parts {
    http::Request::new(()).into_parts().0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_lengths_rule_out_only_names_of_other_lengths() {
        let set: Vec<http::HeaderName> = ["api-key", "cookie", "ocp-apim-subscription-key"]
            .into_iter()
            .map(http::HeaderName::from_static)
            .collect();
        let long = http::HeaderName::from_static(
            "x-a-name-of-seventy-characters-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        );
        let lengths = NameLengths::of(set.iter().chain([&long]));
        for n in &set {
            assert!(lengths.may_hold(n), "{n}");
        }
        // Same lengths, other names: still "may" (the caller compares).
        assert!(lengths.may_hold(&http::HeaderName::from_static("upgrade")));
        assert!(lengths.may_hold(&http::header::EXPECT));
        // Every name of 63 characters or more shares one bit.
        assert!(lengths.may_hold(&http::HeaderName::from_bytes(&[b'y'; 64]).unwrap()));
        assert!(lengths.may_hold(&long));
        for other in [
            http::header::HOST,
            http::header::CONTENT_TYPE,
            http::header::CONTENT_LENGTH,
            http::HeaderName::from_static("x-forwarded-for"),
        ] {
            assert!(!lengths.may_hold(&other), "{other}");
        }
        assert!(!NameLengths::default().may_hold(&http::header::EXPECT));
        // Two names of one length keep it in the set.
        let six = NameLengths::of([&http::header::COOKIE, &http::header::EXPECT]);
        assert!(six.may_hold(&http::header::COOKIE));
        assert!(six.may_hold(&http::header::EXPECT));
        let short = NameLengths::of([&http::header::HOST]);
        assert!(!short.may_hold(&http::HeaderName::from_bytes(&[b'y'; 64]).unwrap()));
    }
    use http::header::{CONTENT_TYPE, HOST};
    use http::{HeaderName, HeaderValue};

    static X_ONE: HeaderName = HeaderName::from_static("x-one");

    fn wire_response(head: &ResponseHeader) -> String {
        let mut buf = Vec::new();
        head.header_to_h1_wire(&mut buf);
        String::from_utf8(buf).unwrap()
    }

    fn wire_request(head: &RequestHeader) -> String {
        let mut buf = Vec::new();
        head.header_to_h1_wire(&mut buf);
        String::from_utf8(buf).unwrap()
    }

    fn parsed_response(reason: Option<&str>) -> ResponseHeader {
        // As pingora builds one it parsed: exactly as much room as headers.
        let mut head = ResponseHeader::build(203, Some(2)).unwrap();
        head.append_header("Content-Type", "application/json")
            .unwrap();
        head.append_header("X-Backend-Thing", "1").unwrap();
        head.set_reason_phrase(reason).unwrap();
        head
    }

    #[test]
    fn a_response_keeps_everything_but_case_and_gets_room() {
        let mut head = parsed_response(Some("Quite Fine"));
        head.extensions_mut().insert(7u32);
        let len = edit_response(&mut head, 3, |h| {
            assert!(
                h.capacity() >= h.len() + 3,
                "room reserved: {}",
                h.capacity()
            );
            h.insert(X_ONE.clone(), HeaderValue::from_static("a"));
            h.len()
        });
        assert_eq!(len, 3);
        assert_eq!(head.status, 203);
        assert_eq!(head.get_reason_phrase(), Some("Quite Fine"));
        assert_eq!(head.version, http::Version::HTTP_11);
        assert_eq!(head.extensions.get::<u32>(), Some(&7));
        assert!(!head.has_case());
        assert_eq!(head.headers["x-backend-thing"], "1");
        assert_eq!(head.headers["x-one"], "a");
        // Standard names keep their usual capitals; others go lower case.
        assert_eq!(
            wire_response(&head),
            "Content-Type: application/json\r\nx-backend-thing: 1\r\nx-one: a\r\n"
        );
        // Later edits through pingora still work on the uncased head.
        head.insert_header("X-Two", "b").unwrap();
        assert_eq!(head.headers["x-two"], "b");
    }

    #[test]
    fn a_standard_reason_stays_the_default() {
        let mut head = parsed_response(None);
        edit_response(&mut head, 0, |_| ());
        assert_eq!(
            head.get_reason_phrase(),
            Some("Non Authoritative Information")
        );
        head.set_status(404).unwrap();
        // Nothing was stored: the phrase follows the status.
        assert_eq!(head.get_reason_phrase(), Some("Not Found"));
    }

    #[test]
    fn a_removal_and_the_edit_result_come_back() {
        let mut head = parsed_response(None);
        let removed = edit_response(&mut head, 0, |h| h.remove(CONTENT_TYPE));
        assert_eq!(removed.unwrap(), "application/json");
        assert!(!head.headers.contains_key(CONTENT_TYPE));
    }

    fn parsed_request(target: &[u8]) -> RequestHeader {
        let mut head = RequestHeader::build("POST", target, Some(2)).unwrap();
        head.append_header("Host", "gw.example").unwrap();
        head.append_header("Api-Key", "client").unwrap();
        head
    }

    #[test]
    fn a_request_keeps_method_uri_and_version() {
        let mut head = parsed_request(b"/openai/chat?api-version=1");
        head.set_version(http::Version::HTTP_10);
        edit_request(&mut head, 2, |h| {
            assert!(h.capacity() >= h.len() + 2);
            h.insert(HOST, HeaderValue::from_static("backend.example"));
            h.remove("api-key");
            h.insert(X_ONE.clone(), HeaderValue::from_static("a"));
        })
        .unwrap();
        assert_eq!(head.method, http::Method::POST);
        assert_eq!(head.uri, "/openai/chat?api-version=1");
        assert_eq!(head.raw_path(), b"/openai/chat?api-version=1");
        assert_eq!(head.version, http::Version::HTTP_10);
        assert!(!head.has_case());
        assert_eq!(wire_request(&head), "Host: backend.example\r\nx-one: a\r\n");
    }

    #[test]
    fn a_target_the_uri_does_not_reproduce_goes_back_as_it_was() {
        for target in [
            &b"http://gw.example/openai/chat?x=1"[..],
            &b"/openai/\xff\xfe?x=1"[..],
        ] {
            let mut head = parsed_request(target);
            let utf8 = head.raw_path_is_utf8();
            edit_request(&mut head, 0, |h| h.remove("api-key")).unwrap();
            assert_eq!(head.raw_path(), target, "{target:?}");
            assert_eq!(head.raw_path_is_utf8(), utf8);
        }
    }

    #[test]
    fn http2s_end_of_stream_flag_is_kept() {
        for end in [false, true] {
            let mut head = parsed_request(b"/x");
            head.set_version(http::Version::HTTP_2);
            head.set_send_end_stream(end);
            edit_request(&mut head, 0, |_| ()).unwrap();
            assert_eq!(head.send_end_stream(), Some(end));
        }
        let mut head = parsed_request(b"/x");
        edit_request(&mut head, 0, |_| ()).unwrap();
        assert_eq!(head.send_end_stream(), None);
    }
}
