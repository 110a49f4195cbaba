//! Which failed attempts may be retried on another backend.

use crate::Outcome;

/// How a call may be retried on another backend after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// A generation or embedding call (chat completions, completions, embeddings, responses, audio transcriptions,
    /// translations and speech, image generations, edits and variations): it changes nothing on the backend that a
    /// second attempt could duplicate, so every failure may fail over.
    Generation,
    /// GET, HEAD or OPTIONS: safe to repeat, so every failure may fail over.
    Read,
    /// Any other call that changes state (uploading a file, creating a batch, a vector store, a fine-tuning job, an
    /// assistant, a thread, deleting or cancelling anything...): it fails over only when the backend surely did not
    /// act on it.
    Stateful,
}

/// Classifies a call by its method (compared without regard to case) and its path after the API prefix, such as
/// `/deployments/gpt-4o/chat/completions`, `/v1/chat/completions`, `/files` or `/v1/responses`.
///
/// Only the path's last one or two segments are looked at, and any query string is ignored. A POST to a generation
/// endpoint is [`CallKind::Generation`]; GET, HEAD and OPTIONS are [`CallKind::Read`]; everything else (including
/// other methods on generation endpoints, and POSTs below them such as `/responses/{id}/cancel`) is
/// [`CallKind::Stateful`].
pub fn call_kind(method: &str, rest_path: &str) -> CallKind {
    call_kind_with(method, rest_path, false)
}

/// [`call_kind`], for a caller that has already found the path (without query or fragment) to end in a model
/// endpoint, `completions`, `embeddings` or `responses` (`model_endpoint`): a POST to it is then
/// [`CallKind::Generation`] without a second look at the path. With `model_endpoint` false the path is read as
/// [`call_kind`] reads it.
pub fn call_kind_with(method: &str, rest_path: &str, model_endpoint: bool) -> CallKind {
    // The method as `http` spells it, else in any case.
    let is = |name: &str| method == name || method.eq_ignore_ascii_case(name);
    if is("POST") && (model_endpoint || is_generation_path(rest_path)) {
        CallKind::Generation
    } else if ["GET", "HEAD", "OPTIONS"].into_iter().any(is) {
        CallKind::Read
    } else {
        CallKind::Stateful
    }
}

/// The last non-empty `/`-separated segment of `path` and what is before it.
fn last_segment(path: &[u8]) -> (&[u8], &[u8]) {
    let end = path.iter().rposition(|&b| b != b'/').map_or(0, |i| i + 1);
    let path = &path[..end];
    let start = memchr::memrchr(b'/', path).map_or(0, |i| i + 1);
    (&path[start..], &path[..start])
}

/// Whether the path (query ignored) ends in a generation or embedding endpoint.
fn is_generation_path(path: &str) -> bool {
    let path = path.as_bytes();
    let path = &path[..memchr::memchr2(b'?', b'#', path).unwrap_or(path.len())];
    let (last, rest) = last_segment(path);
    let is = |segment: &[u8], name: &str| segment.eq_ignore_ascii_case(name.as_bytes());
    if ["completions", "embeddings", "responses"]
        .iter()
        .any(|name| is(last, name))
    {
        return true;
    }
    let (before, _) = last_segment(rest);
    let in_group =
        |group: &str, names: &[&str]| is(before, group) && names.iter().any(|name| is(last, name));
    in_group("audio", &["transcriptions", "translations", "speech"])
        || in_group("images", &["generations", "edits", "variations"])
}

impl CallKind {
    /// Whether an attempt that ended in `outcome` may be retried on another backend, provided nothing of its answer
    /// has reached the client yet.
    ///
    /// - [`Generation`](Self::Generation) and [`Read`](Self::Read): a 408, a 429, any 5xx, or any connection-level
    ///   failure (no connection, timeout, connection lost).
    /// - [`Stateful`](Self::Stateful): only a 429 (the backend refused before acting) or a failure to connect (the
    ///   request never left); after a timeout, a lost connection or a 5xx the backend may have acted.
    pub fn may_fail_over(self, outcome: &Outcome) -> bool {
        match (self, outcome) {
            (_, Outcome::Status { status: 429, .. }) | (_, Outcome::ConnectFailed) => true,
            (CallKind::Stateful, _) => false,
            (_, Outcome::Status { status, .. }) => *status == 408 || (500..=599).contains(status),
            (_, Outcome::Timeout | Outcome::ConnectionLost) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn status(status: u16) -> Outcome {
        Outcome::Status {
            status,
            retry_after: Some(Duration::from_secs(1)),
        }
    }

    #[test]
    fn generation_endpoints_posted_to() {
        for path in [
            "/deployments/gpt-4o/chat/completions",
            "/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            "/v1/chat/completions",
            "/deployments/davinci/completions",
            "/deployments/ada/embeddings",
            "/v1/embeddings",
            "/v1/responses",
            "/openai/responses?api-version=preview",
            "/responses/",
            "/deployments/whisper/audio/transcriptions",
            "/v1/audio/translations",
            "/v1/audio/speech",
            "/deployments/dalle/images/generations",
            "/v1/images/edits",
            "/v1/images/variations",
            "/deployments/x/extensions/chat/completions",
            "/v1/Chat/Completions",
            "/v1/embeddings#top",
        ] {
            assert_eq!(call_kind("POST", path), CallKind::Generation, "{path}");
            assert_eq!(call_kind("post", path), CallKind::Generation, "{path}");
        }
    }

    /// The plain reading of the rule: split at `?` or `#`, the last two
    /// non-empty segments, compared ignoring case.
    fn is_generation_path_by_the_book(path: &str) -> bool {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let mut segments = path.rsplit('/').filter(|segment| !segment.is_empty());
        let last = segments.next().unwrap_or_default();
        let before = segments.next().unwrap_or_default();
        let is = |segment: &str, name: &str| segment.eq_ignore_ascii_case(name);
        let in_group = |group: &str, names: &[&str]| {
            is(before, group) && names.iter().any(|name| is(last, name))
        };
        ["completions", "embeddings", "responses"]
            .iter()
            .any(|name| is(last, name))
            || in_group("audio", &["transcriptions", "translations", "speech"])
            || in_group("images", &["generations", "edits", "variations"])
    }

    #[test]
    fn the_segment_walk_reads_paths_as_the_plain_rule_does() {
        let parts = [
            "",
            "/",
            "//",
            "?",
            "#",
            "a",
            "audio",
            "AUDIO",
            "images",
            "speech",
            "Edits",
            "completions",
            "responses",
            "embeddings",
            "transcriptions",
            "x?y",
            "?audio/",
        ];
        let mut seed = 0x9e37_79b9_u32;
        let mut generation = [0, 0];
        for _ in 0..20_000 {
            let mut path = String::new();
            for _ in 0..(seed % 6) {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                path.push_str(parts[seed as usize % parts.len()]);
                if seed & 0x100 != 0 {
                    path.push('/');
                }
            }
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let is = is_generation_path(&path);
            assert_eq!(is, is_generation_path_by_the_book(&path), "{path:?}");
            generation[usize::from(is)] += 1;
        }
        // Both answers were well represented.
        assert!(
            generation[0] > 2_000 && generation[1] > 2_000,
            "{generation:?}"
        );
        for path in [
            "//v1//audio//speech//",
            "/audio/speech?x=/a/b",
            "speech",
            "/images/",
        ] {
            assert_eq!(
                is_generation_path(path),
                is_generation_path_by_the_book(path),
                "{path}"
            );
        }
        assert!(is_generation_path("//v1//audio//speech//"));
        assert!(!is_generation_path("/speech"));
    }

    #[test]
    fn a_known_model_endpoint_makes_a_post_a_generation_and_nothing_else() {
        for method in ["POST", "post", "Post"] {
            // The caller's word is taken: the path is not read again.
            assert_eq!(call_kind_with(method, "/files", true), CallKind::Generation);
            assert_eq!(
                call_kind_with(method, "/v1/chat/completions", true),
                CallKind::Generation
            );
            // Without it, the path decides, as for `call_kind`.
            assert_eq!(call_kind_with(method, "/files", false), CallKind::Stateful);
            assert_eq!(
                call_kind_with(method, "/v1/audio/speech", false),
                CallKind::Generation
            );
        }
        for method in ["GET", "head", "OPTIONS"] {
            assert_eq!(call_kind_with(method, "/files", true), CallKind::Read);
        }
        for method in ["DELETE", "PUT", "PATCH", "POSTS", ""] {
            assert_eq!(
                call_kind_with(method, "/v1/chat/completions", true),
                CallKind::Stateful,
                "{method}"
            );
        }
    }

    #[test]
    fn reads_whatever_the_path() {
        for method in ["GET", "HEAD", "OPTIONS", "get", "Head", "options"] {
            for path in ["/files", "/v1/responses/resp_1", "/v1/chat/completions", ""] {
                assert_eq!(call_kind(method, path), CallKind::Read, "{method} {path}");
            }
        }
    }

    #[test]
    fn everything_else_changes_state() {
        for (method, path) in [
            ("POST", "/files"),
            ("POST", "/v1/batches"),
            ("POST", "/v1/batches/batch_1/cancel"),
            ("POST", "/vector_stores"),
            ("POST", "/fine_tuning/jobs"),
            ("POST", "/assistants"),
            ("POST", "/threads/thread_1/runs"),
            ("POST", "/v1/responses/resp_1/cancel"),
            ("POST", "/v1/chat/completions/chatcmpl_1"),
            ("POST", "/v1/speech"),
            ("POST", "/v1/transcriptions"),
            ("POST", "/v1/generations"),
            ("POST", "/v1/edits"),
            ("POST", "/v1/audio/generations"),
            ("POST", "/v1/images/speech"),
            ("POST", "/files?purpose=/completions"),
            ("POST", ""),
            ("POST", "/"),
            ("DELETE", "/files/file_1"),
            ("DELETE", "/v1/responses"),
            ("PUT", "/v1/chat/completions"),
            ("PATCH", "/v1/embeddings"),
            ("POSTS", "/v1/embeddings"),
            ("", "/v1/embeddings"),
        ] {
            assert_eq!(
                call_kind(method, path),
                CallKind::Stateful,
                "{method} {path}"
            );
        }
    }

    #[test]
    fn generation_and_reads_fail_over_on_every_failure() {
        for kind in [CallKind::Generation, CallKind::Read] {
            for code in [408, 429, 500, 502, 503, 504, 599] {
                assert!(kind.may_fail_over(&status(code)), "{kind:?} {code}");
            }
            for code in [
                200, 201, 400, 401, 403, 404, 407, 409, 413, 428, 430, 499, 600,
            ] {
                assert!(!kind.may_fail_over(&status(code)), "{kind:?} {code}");
            }
            assert!(kind.may_fail_over(&Outcome::ConnectFailed));
            assert!(kind.may_fail_over(&Outcome::Timeout));
            assert!(kind.may_fail_over(&Outcome::ConnectionLost));
        }
    }

    #[test]
    fn stateful_calls_fail_over_only_when_the_backend_surely_did_not_act() {
        let kind = CallKind::Stateful;
        assert!(kind.may_fail_over(&status(429)));
        assert!(kind.may_fail_over(&Outcome::ConnectFailed));
        for code in [200, 400, 404, 408, 500, 502, 503, 504] {
            assert!(!kind.may_fail_over(&status(code)), "{code}");
        }
        assert!(!kind.may_fail_over(&Outcome::Timeout));
        assert!(!kind.may_fail_over(&Outcome::ConnectionLost));
    }
}
