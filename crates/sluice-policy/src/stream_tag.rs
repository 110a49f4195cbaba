//! `x-ms-stream`: decided from the request body's top-level `stream` field,
//! as APIM's streaming lab policy does.
//!
//! APIM evaluates `content["stream"].ToString()` and compares it to "true"
//! ignoring case, then writes the .NET boolean, so the header is `True` or
//! `False` (capitalised). A JSON `true`, or the string `"TRUE"`, count as true;
//! anything else, a missing field, `null`, or a body that is not JSON, is false.

use serde::Deserialize;

/// The header value for a flag.
pub fn header_value(stream: bool) -> &'static str {
    if stream { "True" } else { "False" }
}

#[derive(Deserialize)]
struct Probe {
    // Only this field is materialised; serde skips every other one.
    #[serde(default)]
    stream: Option<serde_json::Value>,
}

/// Read the top-level `stream` field of a JSON body without building a tree
/// of it (other fields are skipped, nested `stream` keys do not count).
pub fn stream_flag(body: &[u8]) -> bool {
    // Cheap exit: a body that never mentions "stream" cannot set it.
    if memchr::memmem::find(body, b"\"stream\"").is_none() {
        return false;
    }
    match serde_json::from_slice::<Probe>(body) {
        Ok(Probe {
            stream: Some(serde_json::Value::Bool(b)),
        }) => b,
        Ok(Probe {
            stream: Some(serde_json::Value::String(s)),
        }) => s.eq_ignore_ascii_case("true"),
        _ => false,
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
        assert!(stream_flag(br#"{"stream":"tr\u0075e"}"#));
        assert!(!stream_flag(br#"{"stream":false}"#));
        assert!(!stream_flag(br#"{"stream":null}"#));
        assert!(!stream_flag(br#"{"stream":1}"#));
        assert!(!stream_flag(br#"{"stream":{"a":true}}"#));
        assert!(!stream_flag(br#"{"messages":[{"stream":true}]}"#));
        assert!(!stream_flag(br#"{"prompt":"\"stream\": true"}"#));
        assert!(!stream_flag(b"not json \"stream\""));
        assert!(!stream_flag(b""));
    }

    #[test]
    fn header_values_are_capitalised() {
        assert_eq!(header_value(true), "True");
        assert_eq!(header_value(false), "False");
    }
}
