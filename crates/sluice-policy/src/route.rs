//! Which API a request belongs to, and the path and query it is forwarded with.

use std::borrow::Cow;

use sluice_config::Api;

/// Matches request paths to APIs by their path prefix (the longest wins).
#[derive(Debug, Clone)]
pub struct ApiRouter {
    /// (prefix, api index), longest prefix first.
    prefixes: Vec<(String, usize)>,
}

/// The API a request matched and the part of the path after its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchedApi<'a> {
    pub index: usize,
    /// Path after the API's prefix, starting with `/` or empty.
    pub rest: &'a str,
}

impl ApiRouter {
    pub fn new(apis: &[Api]) -> Self {
        let mut prefixes: Vec<(String, usize)> = apis
            .iter()
            .enumerate()
            .map(|(i, a)| (a.path.clone(), i))
            .collect();
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        ApiRouter { prefixes }
    }

    /// The API serving `path` (no query string), if any. `/openai` matches
    /// `/openai` and `/openai/...`, never `/openaix`.
    pub fn route<'a>(&self, path: &'a str) -> Option<MatchedApi<'a>> {
        self.prefixes.iter().find_map(|(prefix, index)| {
            let rest = path.strip_prefix(prefix.as_str())?;
            (rest.is_empty() || rest.starts_with('/')).then_some(MatchedApi {
                index: *index,
                rest,
            })
        })
    }
}

/// Where every backend path starts (after the backend's base path).
const BACKEND_PREFIX: &str = "/openai";

/// What a deployments-style path after the API prefix starts with.
const DEPLOYMENTS: &str = "/deployments/";

/// The deployment segment of `rest` (`/deployments/{name}...`), and what
/// follows it; the name may be empty.
fn deployment_segment(rest: &str) -> Option<(&str, &str)> {
    let after = rest.strip_prefix(DEPLOYMENTS)?;
    // A byte search: `/` is ASCII, so `i` is a char boundary.
    Some(match memchr::memchr(b'/', after.as_bytes()) {
        Some(i) => after.split_at(i),
        None => (after, ""),
    })
}

/// The path sent to a backend: its base path, `/openai`, then the rest of the
/// client's path, with the deployment segment renamed when the backend maps it.
pub fn upstream_path<'a>(
    base_path: &str,
    rest: &'a str,
    rename: impl Fn(&str) -> Option<&'a str>,
) -> String {
    let mut out = String::with_capacity(base_path.len() + BACKEND_PREFIX.len() + rest.len() + 16);
    out.push_str(base_path);
    out.push_str(BACKEND_PREFIX);
    match deployment_segment(rest) {
        Some((name, tail)) => {
            out.push_str("/deployments/");
            out.push_str(rename(name).unwrap_or(name));
            out.push_str(tail);
        }
        None => out.push_str(rest),
    }
    out
}

/// Whether [`upstream_path`] would give back `path`, the client's path whose
/// API-relative part is `rest`: the API sits at `/openai`, the backend has no
/// base path and does not rename the deployment. Answered without building
/// anything (most calls reach their backend by the path they came with).
pub fn keeps_path<'a>(
    base_path: &str,
    path: &str,
    rest: &'a str,
    rename: impl Fn(&str) -> Option<&'a str>,
) -> bool {
    base_path.is_empty()
        && path.len() == BACKEND_PREFIX.len() + rest.len()
        && path.starts_with(BACKEND_PREFIX)
        && path.ends_with(rest)
        && deployment_segment(rest).is_none_or(|(name, _)| rename(name).is_none_or(|to| to == name))
}

/// Whether a path has a `.` or `..` segment, plain or percent-encoded, or a
/// segment hiding an encoded `/` or `\`. Such paths are refused: forwarded
/// with the backend's credential they could reach other APIs on the backend.
pub fn has_dot_segments(path: &str) -> bool {
    // Without `%` a dot segment can only start the path or follow a `/`:
    // one search for both bytes settles the usual path.
    let b = path.as_bytes();
    let suspect =
        memchr::memchr2_iter(b'%', b'.', b).any(|i| b[i] == b'%' || i == 0 || b[i - 1] == b'/');
    if !suspect {
        return false;
    }
    path.split('/').any(|seg| {
        if seg.is_empty() {
            return false;
        }
        if !seg.contains('%') {
            return seg == "." || seg == "..";
        }
        let d = percent_decode(seg);
        d == b"." || d == b".." || d.contains(&b'/') || d.contains(&b'\\')
    })
}

/// Where [`deployment_of`] finds the deployment in `rest`, as a byte range:
/// for a caller that must let go of `rest` before it reads the name again.
pub fn deployment_range(rest: &str) -> Option<std::ops::Range<usize>> {
    deployment_of(rest).map(|name| DEPLOYMENTS.len()..DEPLOYMENTS.len() + name.len())
}

/// The deployment named in a deployments-style path, if any.
pub fn deployment_of(rest: &str) -> Option<&str> {
    let (name, _) = deployment_segment(rest)?;
    (!name.is_empty()).then_some(name)
}

/// Whether the query `q` may hold a parameter called `name`: it has `name`
/// spelled out, or a `%` or `+` (then the name may be encoded). One pass
/// over the bytes: a query is short, and a vector search set up for each of
/// the three would cost more than the whole walk.
fn may_hold(q: &[u8], name: &[u8]) -> bool {
    let Some(&first) = name.first() else {
        return true;
    };
    q.iter()
        .enumerate()
        .any(|(i, &b)| b == b'%' || b == b'+' || (b == first && q[i..].starts_with(name)))
}

/// The query string without parameter `name` (the client's subscription key
/// never goes upstream). A parameter is `name` when its name decodes to it
/// (form encoding: `+` is a space, `%XX` a byte), so `subscription%2Dkey=` is
/// removed too. Every other parameter is forwarded byte for byte as the client
/// sent it, in its order: never decoded and re-encoded (Azure is picky).
pub fn strip_query_param<'q>(query: &'q str, name: &str) -> Cow<'q, str> {
    // The name can only be there spelled out, or encoded (with `%` or `+`).
    if !may_hold(query.as_bytes(), name.as_bytes()) {
        return Cow::Borrowed(query);
    }
    if !query.split('&').any(|p| is_param(p, name)) {
        return Cow::Borrowed(query);
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !is_param(p, name))
        .collect();
    Cow::Owned(kept.join("&"))
}

/// Whether the raw `name=value` parameter `param` is called `name` once decoded.
fn is_param(param: &str, name: &str) -> bool {
    let raw = param.split_once('=').map_or(param, |(n, _)| n);
    if !raw.contains(['%', '+']) {
        // Nothing to decode (the usual case): the raw name is the name.
        return !param.is_empty() && raw == name;
    }
    // One parameter: the parser yields its (name, value), or nothing when it is empty.
    form_urlencoded::parse(param.as_bytes())
        .next()
        .is_some_and(|(n, _)| n == name)
}

/// The decoded value of the first query parameter called `name` (decoded too),
/// with `application/x-www-form-urlencoded` rules: `+` is a space, `%XX` a
/// byte, a `%` without two hex digits stays as it is. Decoded bytes that are
/// not UTF-8 read as U+FFFD (as `form_urlencoded` and .NET both decode).
pub fn query_param(query: &str, name: &str) -> Option<Vec<u8>> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(n, _)| n == name)
        .map(|(_, value)| value.into_owned().into_bytes())
}

/// Decode `%XX` escapes and `+` (form encoding) in a query or path component,
/// to bytes; a `%` without two hex digits stays as it is.
pub fn percent_decode(s: &str) -> Vec<u8> {
    if s.contains('+') {
        let spaced = s.replace('+', " ");
        percent_encoding::percent_decode_str(&spaced).collect()
    } else {
        percent_encoding::percent_decode_str(s).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(name: &str, path: &str) -> Api {
        Api {
            name: name.into(),
            path: path.into(),
            backends: vec!["b".into()],
            pool: "api/x".into(),
            deployment_pools: Default::default(),
            models: vec![],
            failover: sluice_config::Failover::default(),
            subscription: sluice_config::SubscriptionSettings::default(),
            max_request_body_bytes: 1024,
            websocket_idle: std::time::Duration::from_secs(600),
            auth: sluice_config::ApiAuth::Key,
            policies: vec![],
        }
    }

    #[test]
    fn routes_by_longest_prefix_on_segment_boundaries() {
        let r = ApiRouter::new(&[api("root", "/openai"), api("team", "/team/openai")]);
        let m = r.route("/openai/deployments/d/chat/completions").unwrap();
        assert_eq!((m.index, m.rest), (0, "/deployments/d/chat/completions"));
        assert_eq!(r.route("/openai").unwrap().rest, "");
        let m = r.route("/team/openai/v1/embeddings").unwrap();
        assert_eq!((m.index, m.rest), (1, "/v1/embeddings"));
        assert!(r.route("/openaix").is_none());
        assert!(r.route("/team/openaiv1").is_none());
        assert!(r.route("/").is_none());
        assert!(r.route("/team").is_none());
    }

    #[test]
    fn dot_segments_are_found() {
        for p in [
            "/openai/../x",
            "/openai/./x",
            "/openai/%2e%2E/x",
            "/openai/.%2e",
            "/openai/deployments/a%2f..%2fb/chat",
            "/openai/a%5cb",
            "/..",
            "..",
            ".",
            "./x",
            "/openai/x/..",
        ] {
            assert!(has_dot_segments(p), "{p}");
        }
        for p in [
            "/openai/deployments/gpt-4.1/chat/completions",
            "/openai/v1/x..y",
            "/openai/deployments/my%20model/chat/completions",
            "/openai/%2e%2e%2e",
            "/openai//x",
            "/",
            "/openai/.hidden/x",
            "/openai/...",
            "x.y/z",
        ] {
            assert!(!has_dot_segments(p), "{p}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb+c"), b"a/b c");
        assert_eq!(percent_decode("100%"), b"100%");
        assert_eq!(percent_decode("%4"), b"%4");
        assert_eq!(percent_decode("%zz"), b"%zz");
        assert_eq!(percent_decode("%41"), b"A");
    }

    #[test]
    fn may_hold_finds_every_substring_and_any_encoding() {
        let hay = b"api-version=2024-10-21&subscription-key=k&sub=1";
        for start in 0..hay.len() {
            for end in start..=hay.len() {
                assert!(may_hold(hay, &hay[start..end]), "{start}..{end}");
            }
        }
        assert!(may_hold(b"", b""));
        assert!(!may_hold(b"", b"a"));
        assert!(!may_hold(hay, b"subscription-keys"));
        assert!(!may_hold(hay, b"version-"));
        assert!(!may_hold(b"subscription-ke", b"subscription-key"));
        // An encoded name may be anywhere once a `%` or `+` is.
        assert!(may_hold(
            b"api-version=1&subscription%2Dkey=k",
            b"subscription-key"
        ));
        assert!(may_hold(b"a=1%20", b"zzz"));
        assert!(may_hold(b"+", b"zzz"));
        assert!(may_hold(b"x=a+b", b"zzz"));
        assert!(!may_hold(b"api-version=2024-10-21", b"subscription-key"));
    }

    #[test]
    fn query_params() {
        let q = "api-version=2024-10-21&subscription-key=abc%3D&x=1";
        assert_eq!(query_param(q, "subscription-key").unwrap(), b"abc=");
        assert_eq!(query_param(q, "nope"), None);
        assert_eq!(
            strip_query_param(q, "subscription-key"),
            "api-version=2024-10-21&x=1"
        );
        assert_eq!(
            strip_query_param("api-version=1", "subscription-key"),
            "api-version=1"
        );
        assert_eq!(
            strip_query_param("subscription-key=a", "subscription-key"),
            ""
        );
        assert_eq!(
            strip_query_param("subscription%2Dkey=a&b=2", "subscription-key"),
            "b=2"
        );
        // Names without escapes are compared as they are; near misses stay.
        assert_eq!(
            strip_query_param(
                "subscription-key2=a&xsubscription-key=b&subscription-key",
                "subscription-key"
            ),
            "subscription-key2=a&xsubscription-key=b"
        );
        assert_eq!(strip_query_param("&&a=1", "a"), "");
        assert_eq!(strip_query_param("a=1&&b", "a"), "b");
        // A `+` in a name is a space.
        assert_eq!(strip_query_param("my+key=1&k=2", "my key"), "k=2");
        assert_eq!(strip_query_param("my+key=1&k=2", "my+key"), "my+key=1&k=2");
    }

    #[test]
    fn encoded_names_and_values() {
        // `+` and `%20` are both spaces in a value.
        let q = "subscription-key=a+b%20c&x=1";
        assert_eq!(query_param(q, "subscription-key").unwrap(), b"a b c");
        // An encoded name is the same parameter, for reading and for stripping.
        let q = "api-version=2024-10-21&subscription%2Dkey=k%2F1&x=1";
        assert_eq!(query_param(q, "subscription-key").unwrap(), b"k/1");
        assert_eq!(
            strip_query_param(q, "subscription-key"),
            "api-version=2024-10-21&x=1"
        );
        assert_eq!(
            query_param("subscription%2dkey=lower-hex", "subscription-key").unwrap(),
            b"lower-hex"
        );
        // The first of two wins; both are stripped.
        let q = "subscription-key=first&a=1&subscription+key=x&subscription-key=second";
        assert_eq!(query_param(q, "subscription-key").unwrap(), b"first");
        assert_eq!(
            strip_query_param(q, "subscription-key"),
            "a=1&subscription+key=x"
        );
        // A name that only looks like it after decoding something else is another parameter.
        assert_eq!(query_param("subscription-keys=a", "subscription-key"), None);
        assert_eq!(
            query_param("subscription-key%3D=a", "subscription-key"),
            None
        );
        // No value, an empty value, and a bare `%`.
        assert_eq!(
            query_param("subscription-key", "subscription-key").unwrap(),
            b""
        );
        assert_eq!(
            query_param("a=1&subscription-key=", "subscription-key").unwrap(),
            b""
        );
        assert_eq!(
            query_param("subscription-key=100%", "subscription-key").unwrap(),
            b"100%"
        );
        // Bytes that are not UTF-8 read as U+FFFD.
        assert_eq!(
            query_param("subscription-key=%FFk", "subscription-key").unwrap(),
            "\u{FFFD}k".as_bytes()
        );
    }

    #[test]
    fn other_parameters_pass_byte_for_byte() {
        // Escapes, `+`, lowercase hex, empty pieces and odd characters: exactly as sent, never re-encoded.
        let q =
            "api-version=2024-10-21&&filter=a+b%2fc%20d&x=%7E~&subscription-key=k&=v&flag&q=%zz";
        assert_eq!(
            strip_query_param(q, "subscription-key"),
            "api-version=2024-10-21&filter=a+b%2fc%20d&x=%7E~&=v&flag&q=%zz"
        );
        // Without the parameter the query is not rebuilt at all (empty pieces stay).
        let untouched = "a=1&&b=%2F+";
        assert!(matches!(
            strip_query_param(untouched, "subscription-key"),
            Cow::Borrowed(q) if q == untouched
        ));
        assert_eq!(strip_query_param("", "subscription-key"), "");
        // A parameter whose value contains the name is not it.
        assert_eq!(
            strip_query_param("x=subscription-key&subscription-key=k", "subscription-key"),
            "x=subscription-key"
        );
    }

    #[test]
    fn kept_paths_are_exactly_those_built_unchanged() {
        type Rename = dyn Fn(&str) -> Option<&'static str>;
        let map = |d: &str| (d == "gpt").then_some("gpt-eu");
        let same = |d: &str| (d == "gpt").then_some("gpt");
        let rests = [
            "",
            "/deployments/gpt/chat/completions",
            "/deployments/gpt",
            "/deployments/other/embeddings",
            "/deployments/",
            "/deployments//x",
            "/v1/responses",
        ];
        for base in ["", "/base"] {
            for api in ["/openai", "/OPENAI", "/team/openai", "/x"] {
                for rest in rests {
                    let path = format!("{api}{rest}");
                    let rename: [&Rename; 3] = [&|_| None, &map, &same];
                    for r in rename {
                        assert_eq!(
                            keeps_path(base, &path, rest, r),
                            upstream_path(base, rest, r) == path,
                            "{base} {path}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn upstream_paths() {
        let none = |_: &str| None;
        assert_eq!(
            upstream_path("", "/deployments/gpt/chat/completions", none),
            "/openai/deployments/gpt/chat/completions"
        );
        assert_eq!(
            upstream_path("/base", "/v1/embeddings", none),
            "/base/openai/v1/embeddings"
        );
        let map = |n: &str| (n == "gpt").then_some("gpt-eu");
        assert_eq!(
            upstream_path("", "/deployments/gpt/embeddings", map),
            "/openai/deployments/gpt-eu/embeddings"
        );
        assert_eq!(
            upstream_path("", "/deployments/gpt", map),
            "/openai/deployments/gpt-eu"
        );
        assert_eq!(
            deployment_of("/deployments/d1/chat/completions"),
            Some("d1")
        );
        assert_eq!(deployment_of("/v1/chat/completions"), None);
    }

    #[test]
    fn the_deployment_range_is_where_the_deployment_is() {
        for rest in [
            "/deployments/d1/chat/completions",
            "/deployments/gpt-4o",
            "/deployments/x/",
            "/deployments//chat/completions",
            "/deployments/",
            "/v1/chat/completions",
            "/deployment/d1/chat",
            "",
        ] {
            assert_eq!(
                deployment_range(rest).map(|r| &rest[r]),
                deployment_of(rest),
                "{rest}"
            );
        }
        assert_eq!(deployment_range("/deployments/abc/x"), Some(13..16));
    }
}
