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

/// The path sent to a backend: its base path, `/openai`, then the rest of the
/// client's path, with the deployment segment renamed when the backend maps it.
pub fn upstream_path<'a>(
    base_path: &str,
    rest: &'a str,
    rename: impl Fn(&str) -> Option<&'a str>,
) -> String {
    let mut out = String::with_capacity(base_path.len() + 7 + rest.len() + 16);
    out.push_str(base_path);
    out.push_str("/openai");
    if let Some(after) = rest.strip_prefix("/deployments/") {
        let (name, tail) = match after.find('/') {
            Some(i) => after.split_at(i),
            None => (after, ""),
        };
        out.push_str("/deployments/");
        out.push_str(rename(name).unwrap_or(name));
        out.push_str(tail);
    } else {
        out.push_str(rest);
    }
    out
}

/// Whether a path has a `.` or `..` segment, plain or percent-encoded, or a
/// segment hiding an encoded `/` or `\`. Such paths are refused: forwarded
/// with the backend's credential they could reach other APIs on the backend.
pub fn has_dot_segments(path: &str) -> bool {
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

/// The deployment named in a deployments-style path, if any.
pub fn deployment_of(rest: &str) -> Option<&str> {
    let after = rest.strip_prefix("/deployments/")?;
    let name = after.split('/').next()?;
    (!name.is_empty()).then_some(name)
}

/// The query string without parameter `name` (the client's subscription key
/// never goes upstream). Other parameters keep their order and encoding.
pub fn strip_query_param<'q>(query: &'q str, name: &str) -> Cow<'q, str> {
    let has = query
        .split('&')
        .any(|p| p.split('=').next().is_some_and(|k| decoded_eq(k, name)));
    if !has {
        return Cow::Borrowed(query);
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.split('=').next().is_some_and(|k| decoded_eq(k, name)))
        .collect();
    Cow::Owned(kept.join("&"))
}

/// The percent-decoded value of the first query parameter called `name`.
pub fn query_param(query: &str, name: &str) -> Option<Vec<u8>> {
    query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        decoded_eq(k, name).then(|| percent_decode(v))
    })
}

fn decoded_eq(raw: &str, name: &str) -> bool {
    if !raw.contains(['%', '+']) {
        return raw == name;
    }
    percent_decode(raw) == name.as_bytes()
}

/// Decode `%XX` escapes and `+` (form encoding) in a query component.
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    out
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
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
            subscription: sluice_config::SubscriptionSettings::default(),
            max_request_body_bytes: 1024,
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
        ] {
            assert!(has_dot_segments(p), "{p}");
        }
        for p in [
            "/openai/deployments/gpt-4.1/chat/completions",
            "/openai/v1/x..y",
            "/openai//x",
            "/",
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
}
