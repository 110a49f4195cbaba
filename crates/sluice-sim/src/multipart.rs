//! A small `multipart/form-data` reader (RFC 7578 over RFC 2046), enough for file uploads.
//!
//! Written here rather than pulled in (`multer`) because the simulator already holds the whole
//! request body in memory: a slice parser over it is short, has no async machinery, and hands
//! back byte ranges so a file's content can be kept without copying.
//!
//! Delimiters and header lines must end in CRLF, as the RFC requires. Each part needs a
//! `Content-Disposition: form-data; name="..."` header; `filename` (or the RFC 5987
//! `filename*=UTF-8''...` form) marks a file. The preamble before the first delimiter and the
//! epilogue after the closing one are ignored.

use std::ops::Range;

/// One part of the form. `data` is the range of the content inside the parsed body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Part {
    pub(crate) name: String,
    pub(crate) filename: Option<String>,
    pub(crate) content_type: Option<String>,
    pub(crate) data: Range<usize>,
}

impl Part {
    /// The content as trimmed UTF-8 text, for a field that is not a file.
    pub(crate) fn text<'a>(&self, body: &'a [u8]) -> Option<&'a str> {
        std::str::from_utf8(&body[self.data.clone()])
            .ok()
            .map(str::trim)
    }
}

/// The parts of a request whose `Content-Type` header is `content_type`.
pub(crate) fn parse_form(content_type: &str, body: &[u8]) -> Result<Vec<Part>, String> {
    boundary(content_type).and_then(|b| parse(body, &b))
}

/// The trimmed text of the first non-file field called `name`, if present and not empty.
pub(crate) fn field<'a>(parts: &[Part], body: &'a [u8], name: &str) -> Option<&'a str> {
    parts
        .iter()
        .find(|p| p.name == name && p.filename.is_none())
        .and_then(|p| p.text(body))
        .filter(|t| !t.is_empty())
}

/// The `boundary` parameter of a `multipart/form-data` content type.
pub(crate) fn boundary(content_type: &str) -> Result<String, String> {
    let (media, params) = match content_type.split_once(';') {
        Some((m, p)) => (m, p),
        None => (content_type, ""),
    };
    if !media.trim().eq_ignore_ascii_case("multipart/form-data") {
        return Err("The content type must be multipart/form-data.".into());
    }
    let b = params_of(params)
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v)
        .ok_or("The multipart/form-data content type has no boundary.")?;
    // RFC 2046: 1 to 70 characters.
    if b.is_empty() || b.len() > 70 {
        return Err("The multipart boundary must be 1 to 70 characters long.".into());
    }
    Ok(b)
}

/// Split `body` into its parts.
pub(crate) fn parse(body: &[u8], boundary: &str) -> Result<Vec<Part>, String> {
    let dash = format!("--{boundary}");
    let dash = dash.as_bytes();
    // The first delimiter starts the body or follows a CRLF of the preamble.
    let mut pos = if body.starts_with(dash) {
        0
    } else {
        let crlf_dash = [b"\r\n".as_slice(), dash].concat();
        find(body, &crlf_dash, 0).ok_or("The multipart body has no opening boundary.")? + 2
    };
    let delimiter = [b"\r\n".as_slice(), dash].concat();
    let mut parts = Vec::new();
    loop {
        // `pos` is at a `--boundary`.
        pos += dash.len();
        if body[pos..].starts_with(b"--") {
            return Ok(parts);
        }
        // Transport padding (spaces/tabs) may follow a delimiter before its CRLF.
        while matches!(body.get(pos), Some(b' ' | b'\t')) {
            pos += 1;
        }
        if !body[pos..].starts_with(b"\r\n") {
            return Err("A multipart boundary line does not end with CRLF.".into());
        }
        pos += 2;
        let head_end = if body[pos..].starts_with(b"\r\n") {
            pos // no headers at all
        } else {
            find(body, b"\r\n\r\n", pos).ok_or("A multipart part has unterminated headers.")? + 2
        };
        let head = std::str::from_utf8(&body[pos..head_end])
            .map_err(|_| "Multipart part headers are not UTF-8.".to_string())?;
        let data_start = head_end + 2;
        let data_end = find_delimiter(body, &delimiter, data_start)
            .ok_or("The multipart body has no closing boundary.")?;
        parts.push(part_from_headers(head, data_start..data_end)?);
        pos = data_end + 2;
    }
}

fn part_from_headers(head: &str, data: Range<usize>) -> Result<Part, String> {
    let mut disposition = None;
    let mut content_type = None;
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("Malformed multipart header line {line:?}."))?;
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-disposition") {
            disposition = Some(value.trim().to_string());
        } else if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.trim().to_string());
        }
    }
    let disposition = disposition.ok_or("A multipart part has no Content-Disposition header.")?;
    let (kind, params) = disposition
        .split_once(';')
        .unwrap_or((disposition.as_str(), ""));
    if !kind.trim().eq_ignore_ascii_case("form-data") {
        return Err("A multipart part is not form-data.".into());
    }
    let params = params_of(params);
    let get = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.clone())
    };
    let name = get("name").ok_or("A multipart part has no name.")?;
    let filename = get("filename*")
        .and_then(|v| decode_ext_value(&v))
        .or_else(|| get("filename"));
    Ok(Part {
        name,
        filename,
        content_type,
        data,
    })
}

/// `; key=value; key="quoted \"value\""` → pairs (keys trimmed, quotes and escapes removed).
fn params_of(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        // Skip separators and whitespace.
        while matches!(chars.peek(), Some(';' | ' ' | '\t')) {
            chars.next();
        }
        if chars.peek().is_none() {
            return out;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ';' {
                break;
            }
            key.push(c);
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            while matches!(chars.peek(), Some(' ' | '\t')) {
                chars.next();
            }
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(escaped) = chars.next() {
                                value.push(escaped);
                            }
                        }
                        c => value.push(c),
                    }
                }
                // Anything between the closing quote and the next `;` is ignored.
                while chars.peek().is_some_and(|&c| c != ';') {
                    chars.next();
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ';' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
                value = value.trim_end().to_string();
            }
        }
        out.push((key.trim().to_string(), value));
    }
}

/// RFC 5987 `charset'language'percent-encoded` (UTF-8 only).
fn decode_ext_value(v: &str) -> Option<String> {
    let mut it = v.splitn(3, '\'');
    let charset = it.next()?;
    let _language = it.next()?;
    let encoded = it.next()?;
    if !charset.eq_ignore_ascii_case("utf-8") {
        return None;
    }
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The next `CRLF--boundary` that really is a delimiter: followed by `--`, or by optional
/// spaces/tabs and CRLF. (Content must not contain the delimiter, but a longer look-alike such
/// as `--boundaryX` at a line start is content.)
fn find_delimiter(body: &[u8], delimiter: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let at = find(body, delimiter, from)?;
        let mut after = at + delimiter.len();
        if body[after..].starts_with(b"--") {
            return Some(at);
        }
        while matches!(body.get(after), Some(b' ' | b'\t')) {
            after += 1;
        }
        if body[after..].starts_with(b"\r\n") {
            return Some(at);
        }
        from = at + 1;
    }
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > haystack.len() {
        return None;
    }
    memchr::memmem::find(&haystack[from..], needle).map(|i| i + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[&str]) -> Vec<u8> {
        parts.concat().into_bytes()
    }

    #[test]
    fn boundary_from_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=----abc123").unwrap(),
            "----abc123"
        );
        assert_eq!(
            boundary("Multipart/Form-Data;charset=utf-8; BOUNDARY=\"a b;c\"").unwrap(),
            "a b;c"
        );
        assert!(boundary("application/json").is_err());
        assert!(boundary("multipart/form-data").is_err());
        assert!(boundary("multipart/form-data; boundary=").is_err());
        assert!(boundary(&format!("multipart/form-data; boundary={}", "x".repeat(71))).is_err());
    }

    #[test]
    fn parses_fields_and_files() {
        let raw = body(&[
            "preamble to ignore\r\n",
            "--XyZ\r\n",
            "Content-Disposition: form-data; name=\"purpose\"\r\n",
            "\r\n",
            "batch\r\n",
            "--XyZ\r\n",
            "content-disposition: form-data; name=\"file\"; filename=\"in put.jsonl\"\r\n",
            "Content-Type: application/jsonl\r\n",
            "\r\n",
            "{\"a\":1}\r\n{\"b\":2}\r\n",
            "\r\n--XyZ--\r\n",
            "epilogue",
        ]);
        let parts = parse(&raw, "XyZ").unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "purpose");
        assert_eq!(parts[0].filename, None);
        assert_eq!(&raw[parts[0].data.clone()], b"batch");
        assert_eq!(parts[1].name, "file");
        assert_eq!(parts[1].filename.as_deref(), Some("in put.jsonl"));
        assert_eq!(parts[1].content_type.as_deref(), Some("application/jsonl"));
        // The content keeps its own CRLFs; only the one before the delimiter is removed.
        assert_eq!(&raw[parts[1].data.clone()], b"{\"a\":1}\r\n{\"b\":2}\r\n");
    }

    #[test]
    fn binary_content_and_lookalike_boundaries() {
        let mut raw =
            b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.bin\"\r\n\r\n"
                .to_vec();
        let content: Vec<u8> = (0u8..=255).chain(*b"--b not at line start").collect();
        raw.extend_from_slice(&content);
        raw.extend_from_slice(b"\r\n--bb is not it either\r\n--b--");
        let parts = parse(&raw, "b").unwrap();
        assert_eq!(parts.len(), 1);
        let mut expect = content.clone();
        expect.extend_from_slice(b"\r\n--bb is not it either");
        assert_eq!(&raw[parts[0].data.clone()], expect.as_slice());
    }

    #[test]
    fn empty_content_padding_and_escaped_names() {
        let raw = body(&[
            "--q \t\r\n",
            "Content-Disposition: form-data; name=\"a\\\"b\"; filename*=UTF-8''na%C3%AFve%20file.txt\r\n",
            "\r\n",
            "\r\n--q\r\n",
            "Content-Disposition: form-data; name=plain\r\n",
            "\r\n",
            "v\r\n--q--",
        ]);
        let parts = parse(&raw, "q").unwrap();
        assert_eq!(parts[0].name, "a\"b");
        assert_eq!(parts[0].filename.as_deref(), Some("naïve file.txt"));
        assert!(parts[0].data.is_empty());
        assert_eq!(parts[1].name, "plain");
        assert_eq!(&raw[parts[1].data.clone()], b"v");
    }

    #[test]
    fn rejects_malformed_bodies() {
        let cd = "Content-Disposition: form-data; name=\"f\"\r\n\r\n";
        for bad in [
            body(&["no boundary here"]),
            body(&["--b\r\n", cd, "never closed"]),
            body(&["--b\r\n", "Content-Disposition: form-data; name=\"f\""]),
            body(&["--b\r\n", "\r\n", "no disposition\r\n--b--"]),
            body(&[
                "--b\r\n",
                "Content-Disposition: attachment; name=\"f\"\r\n\r\nx\r\n--b--",
            ]),
            body(&[
                "--b\r\n",
                "Content-Disposition: form-data\r\n\r\nx\r\n--b--",
            ]),
            body(&["--b\r\n", "Bogus header\r\n\r\nx\r\n--b--"]),
            body(&["--bxx\r\n", cd, "x\r\n--b--"]),
            // LF-only line endings are not multipart.
            body(&["--b\n", cd, "x\n--b--"]),
        ] {
            assert!(
                parse(&bad, "b").is_err(),
                "{:?}",
                String::from_utf8_lossy(&bad)
            );
        }
        // A body that is only the closing delimiter has no parts.
        assert_eq!(parse(b"--b--\r\n", "b").unwrap(), vec![]);
    }
}
