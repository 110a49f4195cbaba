//! One form field read from the start of a `multipart/form-data` body (RFC 7578), for routing
//! an upload (an audio transcription, an image edit) by its `model` while the body streams.
//!
//! The gateway calls [`boundary`] on the request's Content-Type, then [`find_field`] on the body
//! received so far, each time more arrives, until the answer is not [`FieldSearch::NeedMore`]
//! (or until its own cap on the bytes it will hold, 64 KiB say). The search rescans the prefix
//! from the start on each call and allocates only the value it returns.
//!
//! The OpenAI SDKs (Python's through httpx, and the others alike) write the form fields before
//! the files, so `model` comes within the first few hundred bytes. A client that sends the file
//! first gets [`FieldSearch::NeedMore`] until the gateway gives up at its cap: the field is in
//! the body, but only after the file.

use memchr::{memchr, memchr_iter, memmem};

/// The longest field value [`find_field`] returns; a longer value counts as absent.
pub const MAX_FIELD_BYTES: usize = 256;
/// The longest boundary RFC 2046 allows.
const MAX_BOUNDARY: usize = 70;

/// What [`find_field`] found in a body prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldSearch {
    /// The field's complete value, exactly as sent (nothing trimmed).
    Found(String),
    /// The prefix ends before the answer: call again with more of the body.
    NeedMore,
    /// The body has no such field (its closing delimiter came first), or the field's value is
    /// over [`MAX_FIELD_BYTES`] or not UTF-8.
    Absent,
}

/// The `boundary` parameter of a `multipart/form-data` Content-Type, quoted or not (the media
/// type and parameter names are ASCII case-insensitive). `None` for any other media type, a
/// missing boundary, or one RFC 2046 does not allow: empty, longer than 70 characters, ending
/// with a space, or with a character outside its set (letters, digits, space and
/// `'()+_,-./:=?`) — which also rules out quoted-pair escapes.
pub fn boundary(content_type: &str) -> Option<&str> {
    let (media_type, mut rest) = content_type.split_once(';')?;
    if !media_type
        .trim()
        .eq_ignore_ascii_case("multipart/form-data")
    {
        return None;
    }
    loop {
        rest = rest.trim_start_matches([' ', '\t', ';']);
        let eq = rest.find(['=', ';'])?;
        if rest.as_bytes()[eq] == b';' {
            // A parameter without a value.
            rest = &rest[eq..];
            continue;
        }
        let param = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start_matches([' ', '\t']);
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted_end(quoted.as_bytes())?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => {
                let end = after.find(';').unwrap_or(after.len());
                (after[..end].trim_end_matches([' ', '\t']), &after[end..])
            }
        };
        if param.eq_ignore_ascii_case("boundary") {
            return valid_boundary(value).then_some(value);
        }
        rest = next;
    }
}

/// The index of the quote that closes a quoted string whose content starts `s` (escapes
/// skipped).
fn quoted_end(s: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        match b {
            b'"' => return Some(i),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

/// A boundary RFC 2046 allows (`bchars`, 1 to 70 of them, not ending with a space).
fn valid_boundary(b: &str) -> bool {
    (1..=MAX_BOUNDARY).contains(&b.len())
        && !b.ends_with(' ')
        && b.bytes().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'\''
                        | b'('
                        | b')'
                        | b'+'
                        | b'_'
                        | b','
                        | b'-'
                        | b'.'
                        | b'/'
                        | b':'
                        | b'='
                        | b'?'
                        | b' '
                )
        })
}

/// Looks for the form field `name` in `body_prefix`, the start of a `multipart/form-data` body
/// with this `boundary`.
///
/// Parts are read in order. The one wanted is the first whose `Content-Disposition` is
/// `form-data` with this `name` (case-sensitive; the value quoted or not) and no `filename`
/// (a file part of that name is skipped). Its value is complete once the delimiter after it is
/// (`--boundary` at the start of a line, followed by `--`, or by optional spaces or tabs and a
/// line end). Header names and the disposition's type and parameter names are ASCII
/// case-insensitive; lines may end with CRLF or a bare LF, and a value's line end before its
/// delimiter is not part of it. Text before the first delimiter (a preamble) is skipped. An
/// invalid boundary (see [`boundary`]) finds nothing.
///
/// [`FieldSearch::NeedMore`] while the prefix ends before the answer, including while it ends
/// inside a part before the field (a file sent first; see the [module docs](self)).
/// [`FieldSearch::Absent`] once the closing delimiter comes first, or once the field's value is
/// known to be over [`MAX_FIELD_BYTES`] (before its end arrives, if need be) or turns out not to
/// be UTF-8.
pub fn find_field(body_prefix: &[u8], boundary: &str, name: &str) -> FieldSearch {
    match find_field_range(body_prefix, boundary, name) {
        RangeSearch::Found(range) => match std::str::from_utf8(&body_prefix[range]) {
            Ok(v) => FieldSearch::Found(v.to_owned()),
            Err(_) => FieldSearch::Absent,
        },
        RangeSearch::NeedMore => FieldSearch::NeedMore,
        RangeSearch::Absent => FieldSearch::Absent,
    }
}

/// [`find_field_range`]'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeSearch {
    /// The field's value is `body_prefix[range]` (UTF-8, at most [`MAX_FIELD_BYTES`]).
    Found(std::ops::Range<usize>),
    /// As [`FieldSearch::NeedMore`].
    NeedMore,
    /// As [`FieldSearch::Absent`].
    Absent,
}

/// [`find_field`], answering where the value's bytes are (to replace them: a gateway renames
/// the deployment a v1 upload names, per backend).
pub fn find_field_range(body_prefix: &[u8], boundary: &str, name: &str) -> RangeSearch {
    use RangeSearch as FieldSearch;
    if !valid_boundary(boundary) {
        return FieldSearch::Absent;
    }
    let body = body_prefix;
    let boundary = boundary.as_bytes();
    let mut next = match find_delimiter(body, boundary, 0) {
        Found::Part { next, .. } => next,
        Found::Close { .. } => return FieldSearch::Absent,
        Found::NeedMore => return FieldSearch::NeedMore,
    };
    loop {
        let Some((part, content)) = read_headers(body, next, name.as_bytes()) else {
            return FieldSearch::NeedMore;
        };
        // The line end before the delimiter may be the headers' own last one, when a value
        // is empty and the sender wrote no line end for it: the boundary text still comes
        // after `content`.
        let found = find_delimiter(body, boundary, content);
        let wanted = part.named && !part.file;
        match found {
            Found::Part { line_end, .. } | Found::Close { line_end } if wanted => {
                // The content, without the line end before the delimiter (`\n` or `\r\n`);
                // empty when the delimiter follows the headers' blank line at once.
                let value = body.get(content..line_end).unwrap_or_default();
                let value = value.strip_suffix(b"\r").unwrap_or(value);
                return match std::str::from_utf8(value) {
                    Ok(v) if v.len() <= MAX_FIELD_BYTES => {
                        FieldSearch::Found(content..content + v.len())
                    }
                    _ => FieldSearch::Absent,
                };
            }
            Found::NeedMore if wanted && !may_end_within(body, boundary, content) => {
                return FieldSearch::Absent;
            }
            Found::NeedMore => return FieldSearch::NeedMore,
            Found::Close { .. } => return FieldSearch::Absent,
            Found::Part { next: n, .. } => next = n,
        }
    }
}

/// A delimiter search's outcome.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// A delimiter that starts a part: the `\n` ending the content before it is at `line_end`
    /// (for the first delimiter, 0), the part's headers start at `next`.
    Part { line_end: usize, next: usize },
    /// The closing delimiter, with the `\n` before it at `line_end`.
    Close { line_end: usize },
    /// The prefix ends before a delimiter is known.
    NeedMore,
}

/// What a delimiter's tail (after `--boundary`) says.
#[derive(Debug, PartialEq, Eq)]
enum Tail {
    /// It starts a part, whose headers start at this index.
    Part(usize),
    /// `--`: the closing delimiter.
    Close,
    /// The prefix ends before the tail is known.
    NeedMore,
    /// Not a delimiter (`--boundary` followed by other text).
    No,
}

/// The tail of a possible delimiter whose `--boundary` ends just before `at` (`NeedMore` when
/// `at` is past the end of the prefix).
fn tail(body: &[u8], at: usize) -> Tail {
    match body.get(at..) {
        None | Some([]) | Some([b'-']) => return Tail::NeedMore,
        Some([b'-', b'-', ..]) => return Tail::Close,
        Some(_) => {}
    }
    let mut i = at;
    while let Some(b' ' | b'\t') = body.get(i) {
        i += 1;
    }
    match body.get(i..) {
        None | Some([]) | Some([b'\r']) => Tail::NeedMore,
        Some([b'\n', ..]) => Tail::Part(i + 1),
        Some([b'\r', b'\n', ..]) => Tail::Part(i + 2),
        Some(_) => Tail::No,
    }
}

/// Finds the first delimiter at the start of a line (or of the body) whose boundary text
/// starts at or after `from`.
fn find_delimiter(body: &[u8], boundary: &[u8], mut from: usize) -> Found {
    loop {
        let Some(off) = body.get(from..).and_then(|h| memmem::find(h, boundary)) else {
            return Found::NeedMore;
        };
        let at = from + off;
        from = at + 1;
        // `--` before the boundary, at the start of the body or of a line. (Searching from a
        // part's content, that line end is the headers' last one or a later one: the blank
        // line ends with `\n`, which is neither a `-` nor in a boundary.)
        let Some(dash) = at.checked_sub(2) else {
            continue;
        };
        if &body[dash..at] != b"--" {
            continue;
        }
        let line_start = match dash.checked_sub(1) {
            Some(before) => body[before] == b'\n',
            None => true,
        };
        if !line_start {
            continue;
        }
        let line_end = dash.saturating_sub(1);
        match tail(body, at + boundary.len()) {
            Tail::Part(next) => return Found::Part { line_end, next },
            Tail::Close => return Found::Close { line_end },
            Tail::NeedMore => return Found::NeedMore,
            Tail::No => {}
        }
    }
}

/// Whether the content starting at `content` could still end within [`MAX_FIELD_BYTES`]: the
/// prefix ends before the last place its delimiter's line end could be, or a line end there is
/// followed by what is, as far as the prefix goes, a delimiter.
fn may_end_within(body: &[u8], boundary: &[u8], content: usize) -> bool {
    // The delimiter's `\n` comes right after the value, or after a `\r` after it.
    let last = content + MAX_FIELD_BYTES + 1;
    if body.len() <= last {
        return true;
    }
    // For an empty value it may be the headers' own last line end.
    let from = content - 1;
    memchr_iter(b'\n', &body[from..=last]).any(|off| {
        let dash = from + off + 1;
        let after = &body[dash..];
        let whole = 2 + boundary.len();
        // As much of `--boundary` as the prefix has.
        let known = after.len().min(whole);
        let dashes = known.min(2);
        after[..dashes] == b"--"[..dashes]
            && after[dashes..known] == boundary[..known - dashes]
            && tail(body, dash + whole) != Tail::No
    })
}

/// A part's headers, as far as the search cares.
#[derive(Debug, Default, PartialEq, Eq)]
struct PartHeaders {
    /// `Content-Disposition: form-data` with the wanted name.
    named: bool,
    /// The disposition has a `filename` (or `filename*`).
    file: bool,
}

/// Reads the headers of the part starting at `start`: what they say, and where the content
/// starts (after the blank line). `None` when the prefix ends first.
fn read_headers(body: &[u8], start: usize, name: &[u8]) -> Option<(PartHeaders, usize)> {
    let mut part = PartHeaders::default();
    let mut line_start = start;
    loop {
        let nl = line_start + memchr(b'\n', body.get(line_start..)?)?;
        let line = &body[line_start..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Some((part, nl + 1));
        }
        if let Some(colon) = memchr(b':', line)
            && line[..colon]
                .trim_ascii()
                .eq_ignore_ascii_case(b"content-disposition")
        {
            part = disposition(&line[colon + 1..], name);
        }
        line_start = nl + 1;
    }
}

/// Reads a `Content-Disposition` value: `form-data; name="…"; filename="…"`.
fn disposition(value: &[u8], name: &[u8]) -> PartHeaders {
    let mut part = PartHeaders::default();
    let (kind, mut rest) = match memchr(b';', value) {
        Some(i) => (&value[..i], &value[i..]),
        None => (value, &b""[..]),
    };
    let form_data = kind.trim_ascii().eq_ignore_ascii_case(b"form-data");
    loop {
        while let [b';' | b' ' | b'\t', tail @ ..] = rest {
            rest = tail;
        }
        if rest.is_empty() {
            break;
        }
        let end = rest
            .iter()
            .position(|&b| b == b'=' || b == b';')
            .unwrap_or(rest.len());
        let param = rest[..end].trim_ascii();
        let mut matches_name = false;
        rest = &rest[end..];
        if let [b'=', after @ ..] = rest {
            let after = after.trim_ascii_start();
            if let [b'"', quoted @ ..] = after {
                // An unterminated quoted value matches nothing and ends the parameters.
                let close = quoted_end(quoted);
                matches_name = close.is_some_and(|c| unquoted_eq(&quoted[..c], name));
                rest = close.and_then(|c| quoted.get(c + 1..)).unwrap_or_default();
            } else {
                let end = memchr(b';', after).unwrap_or(after.len());
                matches_name = after[..end].trim_ascii() == name;
                rest = &after[end..];
            }
        }
        if param.eq_ignore_ascii_case(b"name") {
            part.named = form_data && matches_name;
        } else if param.eq_ignore_ascii_case(b"filename")
            || param.eq_ignore_ascii_case(b"filename*")
        {
            part.file = true;
        }
    }
    part
}

/// Whether a quoted string's content (escapes included) reads as `want`.
fn unquoted_eq(quoted: &[u8], want: &[u8]) -> bool {
    let mut want = want.iter();
    let mut i = 0;
    while let Some(&b) = quoted.get(i) {
        let c = if b == b'\\' {
            i += 1;
            match quoted.get(i) {
                Some(&c) => c,
                None => return false,
            }
        } else {
            b
        };
        if want.next() != Some(&c) {
            return false;
        }
        i += 1;
    }
    want.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &str = "4679be242119ea87ab4d83760779f1b5";

    /// What httpx 0.28 sends for `client.audio.transcriptions.create(model="whisper-1",
    /// file=("a.wav", ...))`: its Content-Type and body, byte for byte.
    const HTTPX_TYPE: &str = "multipart/form-data; boundary=4679be242119ea87ab4d83760779f1b5";
    const HTTPX_BODY: &[u8] = b"--4679be242119ea87ab4d83760779f1b5\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--4679be242119ea87ab4d83760779f1b5\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/x-wav\r\n\r\nRIFF\x00\x01WAVEdata\r\n--4679be242119ea87ab4d83760779f1b5--\r\n";

    /// Several fields, then a file whose bytes look like a delimiter of another boundary.
    const HTTPX_FIELDS: &[u8] = b"--d817662b0b8c6c351d0e53e156de5b20\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--d817662b0b8c6c351d0e53e156de5b20\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n--d817662b0b8c6c351d0e53e156de5b20\r\nContent-Disposition: form-data; name=\"response_format\"\r\n\r\njson\r\n--d817662b0b8c6c351d0e53e156de5b20\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n\r\n--x\r\n\r\n--d817662b0b8c6c351d0e53e156de5b20--\r\n";
    const B2: &str = "d817662b0b8c6c351d0e53e156de5b20";

    fn found(v: &str) -> FieldSearch {
        FieldSearch::Found(v.to_owned())
    }

    /// The answer for the whole body, checked against every prefix of it: each is `NeedMore`
    /// or that same answer, and once a prefix has the answer every longer one has it too.
    fn search(body: &[u8], boundary: &str, name: &str) -> FieldSearch {
        let whole = find_field(body, boundary, name);
        let mut answered = false;
        for cut in 0..=body.len() {
            let got = find_field(&body[..cut], boundary, name);
            if got == FieldSearch::NeedMore {
                assert!(!answered, "{name}: NeedMore at {cut} after an answer");
            } else {
                assert_eq!(got, whole, "{name}: cut at {cut}");
                answered = true;
            }
        }
        whole
    }

    #[test]
    fn httpx_transcription_body() {
        let b = boundary(HTTPX_TYPE).unwrap();
        assert_eq!(b, B);
        assert_eq!(search(HTTPX_BODY, b, "model"), found("whisper-1"));
        // The value is complete once the delimiter line after it is.
        let body = std::str::from_utf8(&HTTPX_BODY[..HTTPX_BODY.len() - 30]).unwrap();
        let value_end = body.find("whisper-1").unwrap() + "whisper-1".len();
        let complete = value_end + "\r\n--".len() + B.len() + "\r\n".len();
        for cut in 0..complete {
            assert_eq!(
                find_field(&HTTPX_BODY[..cut], B, "model"),
                FieldSearch::NeedMore,
                "{cut}"
            );
        }
        for cut in complete..=HTTPX_BODY.len() {
            assert_eq!(
                find_field(&HTTPX_BODY[..cut], B, "model"),
                found("whisper-1"),
                "{cut}"
            );
        }
        // The file part is skipped: no field of that name.
        assert_eq!(search(HTTPX_BODY, B, "file"), FieldSearch::Absent);
        assert_eq!(search(HTTPX_BODY, B, "prompt"), FieldSearch::Absent);
        assert_eq!(search(HTTPX_BODY, B, "Model"), FieldSearch::Absent);
    }

    #[test]
    fn several_fields() {
        assert_eq!(
            search(HTTPX_FIELDS, B2, "model"),
            found("gpt-4o-transcribe")
        );
        assert_eq!(search(HTTPX_FIELDS, B2, "language"), found("en"));
        assert_eq!(search(HTTPX_FIELDS, B2, "response_format"), found("json"));
        assert_eq!(search(HTTPX_FIELDS, B2, "file"), FieldSearch::Absent);
        assert_eq!(search(HTTPX_FIELDS, B2, "x"), FieldSearch::Absent);
        // Another boundary finds nothing but the preamble it would be.
        assert_eq!(search(HTTPX_FIELDS, "x", "model"), FieldSearch::NeedMore);
    }

    #[test]
    fn boundaries_from_content_types() {
        let cases: &[(&str, Option<&str>)] = &[
            ("multipart/form-data; boundary=abc", Some("abc")),
            ("multipart/form-data;boundary=abc", Some("abc")),
            ("Multipart/Form-Data; BOUNDARY=abc", Some("abc")),
            (
                "  multipart/form-data ; boundary = abc ; charset=utf-8",
                Some("abc"),
            ),
            ("multipart/form-data; boundary=\"abc\"", Some("abc")),
            (
                "multipart/form-data; boundary=\"a b:c=?\"; x=y",
                Some("a b:c=?"),
            ),
            (
                "multipart/form-data; charset=\"a;boundary=no\"; boundary=yes",
                Some("yes"),
            ),
            (
                "multipart/form-data; charset=\"a\\\"b\"; boundary=yes",
                Some("yes"),
            ),
            ("multipart/form-data; flag; boundary=yes", Some("yes")),
            ("multipart/form-data; ;; boundary=yes;", Some("yes")),
            ("multipart/form-data; boundary=a; boundary=b", Some("a")),
            (
                "multipart/form-data; boundary=\t'()+_,-./:=?\t",
                Some("'()+_,-./:=?"),
            ),
            (
                "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
                Some("----WebKitFormBoundary7MA4YWxkTrZu0gW"),
            ),
            ("multipart/form-data", None),
            ("multipart/form-data;", None),
            ("multipart/form-data; charset=utf-8", None),
            ("multipart/form-data; flag", None),
            ("multipart/form-data; boundary=", None),
            ("multipart/form-data; boundary=\"\"", None),
            ("multipart/form-data; boundary=\"abc", None),
            ("multipart/form-data; boundary=\"ab \"", None),
            ("multipart/form-data; boundary=\"a\\bc\"", None),
            ("multipart/form-data; boundary=a\"b", None),
            ("multipart/form-data; boundary=ab*c", None),
            ("multipart/form-data; boundary=é", None),
            ("multipart/mixed; boundary=abc", None),
            ("application/json; boundary=abc", None),
            ("multipart/form-data-x; boundary=abc", None),
            ("", None),
        ];
        for (ct, want) in cases {
            assert_eq!(boundary(ct), *want, "{ct}");
        }
        let seventy = "b".repeat(70);
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={seventy}")),
            Some(&*seventy)
        );
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={seventy}b")),
            None
        );
    }

    fn part(headers: &str, value: &str) -> String {
        format!("--{B}\r\n{headers}\r\n\r\n{value}\r\n")
    }

    fn close() -> String {
        format!("--{B}--\r\n")
    }

    #[test]
    fn boundary_text_inside_values() {
        // Text that starts like a delimiter but is not one: inside a line, or at the start of a
        // line and followed by more than padding and a line end.
        for value in [
            format!("gpt--{B}"),
            format!("--{B}x"),
            format!("--{B}-x"),
            format!("a\r\n--{B}x"),
            format!("a\n--{B} x"),
            format!("--{B}\rx"),
            format!("-{B}"),
            format!("\r\n-{B}"),
            format!("\r\n{B}"),
            format!("{B}\r\n"),
        ] {
            let mut body = part("Content-Disposition: form-data; name=\"model\"", &value);
            body += &close();
            assert_eq!(
                search(body.as_bytes(), B, "model"),
                found(&value),
                "{value:?}"
            );
            // The same text in an earlier part does not end it either.
            let mut body = part("Content-Disposition: form-data; name=\"x\"", &value);
            body += &part("Content-Disposition: form-data; name=\"model\"", "m");
            body += &close();
            assert_eq!(search(body.as_bytes(), B, "model"), found("m"), "{value:?}");
        }
    }

    #[test]
    fn field_after_a_file() {
        let audio: String = (0..20_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let mut body = part(
            "Content-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav",
            &audio,
        );
        let file_end = body.len();
        body += &part(
            "Content-Disposition: form-data; name=\"model\"",
            "whisper-1",
        );
        body += &close();
        let bytes = body.as_bytes();
        for cut in [0, 10, 200, 10_000, file_end - 3, file_end] {
            assert_eq!(find_field(&bytes[..cut], B, "model"), FieldSearch::NeedMore);
        }
        assert_eq!(find_field(bytes, B, "model"), found("whisper-1"));
        // A file part with the wanted name is skipped; a later field of that name is found.
        let mut body = part(
            "Content-Disposition: form-data; name=\"model\"; filename=\"m.txt\"",
            "file-model",
        );
        body += &part(
            "Content-Disposition: form-data; name=model; filename*=UTF-8''m",
            "f2",
        );
        body += &part(
            "Content-Disposition: form-data; filename=\"\"; name=\"model\"",
            "f3",
        );
        body += &part(
            "Content-Disposition: form-data; name=\"model\"",
            "field-model",
        );
        body += &close();
        assert_eq!(search(body.as_bytes(), B, "model"), found("field-model"));
    }

    #[test]
    fn absent_fields() {
        let mut body = part("Content-Disposition: form-data; name=\"language\"", "en");
        body += &close();
        assert_eq!(search(body.as_bytes(), B, "model"), FieldSearch::Absent);
        // The closing delimiter is enough, with or without what follows it.
        let body = format!("--{B}--");
        assert_eq!(search(body.as_bytes(), B, "model"), FieldSearch::Absent);
        let body = format!("preamble\r\n--{B}--\r\nepilogue");
        assert_eq!(search(body.as_bytes(), B, "model"), FieldSearch::Absent);
        // Only the first field of the name counts, even when its value is too long.
        let mut body = part(
            "Content-Disposition: form-data; name=\"model\"",
            &"m".repeat(MAX_FIELD_BYTES + 1),
        );
        body += &part("Content-Disposition: form-data; name=\"model\"", "second");
        body += &close();
        assert_eq!(search(body.as_bytes(), B, "model"), FieldSearch::Absent);
        // Not form-data, or no name: not the field.
        let mut body = part("Content-Disposition: attachment; name=\"model\"", "a");
        body += &part("Content-Disposition: form-data", "b");
        body += &part("Content-Type: text/plain", "c");
        body += &part("Content-Disposition: form-data; name", "d");
        body += &part("Content-Disposition: form-data; name=\"mode\"", "e");
        body += &part("Content-Disposition: form-data; name=\"models\"", "f");
        body += &part("Content-Disposition: form-data; name=models", "g");
        body += &part("Content-Disposition: form-data; name=\"model", "h");
        body += &part("Content-Disposition: form-data; name=\"mod\\", "i");
        body += &part("Content-Disposition: form-data; xname=model", "j");
        body += &close();
        assert_eq!(search(body.as_bytes(), B, "model"), FieldSearch::Absent);
        // An invalid boundary finds nothing.
        for b in ["", &"b".repeat(71), "a\"b", "ab "] {
            assert_eq!(find_field(body.as_bytes(), b, "model"), FieldSearch::Absent);
        }
    }

    #[test]
    fn value_limits() {
        let long = |n: usize| {
            let mut body = part(
                "Content-Disposition: form-data; name=\"model\"",
                &"v".repeat(n),
            );
            body += &close();
            body
        };
        let at_limit = "v".repeat(MAX_FIELD_BYTES);
        assert_eq!(
            search(long(MAX_FIELD_BYTES).as_bytes(), B, "model"),
            found(&at_limit)
        );
        assert_eq!(
            search(long(MAX_FIELD_BYTES + 1).as_bytes(), B, "model"),
            FieldSearch::Absent
        );
        // A long value is known to be too long before its end arrives.
        let body = long(100_000);
        let content = body.find("vvv").unwrap();
        let bytes = body.as_bytes();
        assert_eq!(
            find_field(&bytes[..content + MAX_FIELD_BYTES + 1], B, "model"),
            FieldSearch::NeedMore
        );
        assert_eq!(
            find_field(&bytes[..content + MAX_FIELD_BYTES + 2], B, "model"),
            FieldSearch::Absent
        );
        // Line ends within the first bytes do not make it look shorter unless a delimiter
        // could follow them.
        let mut v = "a\r\nb\n-".to_owned();
        v += &"v".repeat(1000);
        let mut body = part("Content-Disposition: form-data; name=\"model\"", &v);
        body += &close();
        let content = body.find("a\r\nb").unwrap();
        assert_eq!(
            find_field(&body.as_bytes()[..content + 400], B, "model"),
            FieldSearch::Absent
        );
        // A value that ends right at the limit, its delimiter cut short: not yet known.
        let body = long(MAX_FIELD_BYTES);
        let content = body.find("vvv").unwrap();
        let bytes = body.as_bytes();
        for extra in 0..(4 + B.len()) {
            let cut = content + MAX_FIELD_BYTES + extra;
            assert_eq!(
                find_field(&bytes[..cut], B, "model"),
                FieldSearch::NeedMore,
                "{extra}"
            );
        }
        // LF-only: one byte shorter.
        let body = long(MAX_FIELD_BYTES).replace("\r\n", "\n");
        assert_eq!(search(body.as_bytes(), B, "model"), found(&at_limit));
        let body = long(MAX_FIELD_BYTES + 1).replace("\r\n", "\n");
        assert_eq!(search(body.as_bytes(), B, "model"), FieldSearch::Absent);
        // Not UTF-8.
        let mut body = part("Content-Disposition: form-data; name=\"model\"", "").into_bytes();
        body.truncate(body.len() - 2);
        body.extend_from_slice(b"gpt\xff\r\n");
        body.extend_from_slice(close().as_bytes());
        assert_eq!(search(&body, B, "model"), FieldSearch::Absent);
        // Multi-byte UTF-8 is fine.
        let mut body = part(
            "Content-Disposition: form-data; name=\"model\"",
            "modèle-日本",
        );
        body += &close();
        assert_eq!(search(body.as_bytes(), B, "model"), found("modèle-日本"));
    }

    /// Line ends inside a long value: only one followed by a delimiter (or, as far as the
    /// prefix goes, the start of one) keeps the search waiting. (A delimiter cut short at the
    /// end of the prefix is in `value_limits`.)
    #[test]
    fn long_values_with_line_ends() {
        let absent = [
            "\n-x".to_owned(),
            "\nx-".to_owned(),
            "\n--X".to_owned(),
            format!("\nxx{B}"),
            format!("\n-x{B}"),
            format!("\n--{B}x"),
            format!("\r\n--{B}-x"),
        ];
        for line in absent {
            let mut body = part("Content-Disposition: form-data; name=\"model\"", "");
            body.truncate(body.len() - 2);
            let content = body.len();
            body += "ab";
            body += &line;
            let mut body = body.into_bytes();
            body.resize(content + MAX_FIELD_BYTES + 10, b'v');
            assert_eq!(
                find_field(&body, B, "model"),
                FieldSearch::Absent,
                "{line:?}"
            );
        }
        // A delimiter followed by padding up to the end of the prefix is still possible.
        let mut body = part("Content-Disposition: form-data; name=\"model\"", "ab");
        let content = body.find("ab").unwrap();
        body += &format!("--{B}");
        let mut body = body.into_bytes();
        body.resize(content + MAX_FIELD_BYTES + 10, b' ');
        assert_eq!(find_field(&body, B, "model"), FieldSearch::NeedMore);
        body.extend_from_slice(b"\r\n");
        assert_eq!(find_field(&body, B, "model"), found("ab"));
    }

    /// Long transport padding: the delimiter is unknown until its line end.
    #[test]
    fn delimiter_with_long_padding() {
        let pad = " ".repeat(MAX_FIELD_BYTES + 50);
        for (head, value, found_value) in [
            // Empty value, no line end of its own (LF and CRLF).
            (
                format!("--{B}\nContent-Disposition: form-data; name=\"model\"\n\n"),
                "",
                "",
            ),
            (
                format!("--{B}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"),
                "",
                "",
            ),
            // Empty value with its own line end.
            (
                format!("--{B}\nContent-Disposition: form-data; name=\"model\"\n\n"),
                "\n",
                "",
            ),
            (
                format!("--{B}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"),
                "\r\n",
                "",
            ),
            (
                format!("--{B}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"),
                "m\r\n",
                "m",
            ),
        ] {
            let body = format!("{head}{value}--{B}{pad}");
            assert_eq!(
                find_field(body.as_bytes(), B, "model"),
                FieldSearch::NeedMore,
                "{value:?}"
            );
            let body = body + "\r\n";
            assert_eq!(
                search(body.as_bytes(), B, "model"),
                found(found_value),
                "{value:?}"
            );
        }
    }

    #[test]
    fn preamble_and_padding() {
        let mut body = format!("This is a preamble.\r\n--not{B}\r\n-{B}\r\n");
        body += &part("Content-Disposition: form-data; name=\"model\"", "gpt-4o");
        body += &close();
        body += "epilogue";
        assert_eq!(search(body.as_bytes(), B, "model"), found("gpt-4o"));
        // A preamble that only looks like a delimiter in the middle of a line.
        let body = format!(
            "x--{B}\r\n{}",
            part("Content-Disposition: form-data; name=\"model\"", "gpt-4o")
        ) + &close();
        assert_eq!(search(body.as_bytes(), B, "model"), found("gpt-4o"));
        // Transport padding after delimiters.
        let body = format!(
            "--{B} \t \r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--{B}\t\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--{B}  \r\n"
        );
        assert_eq!(search(body.as_bytes(), B, "model"), found("m"));
        assert_eq!(search(body.as_bytes(), B, "a"), found("1"));
    }

    #[test]
    fn lf_only_and_mixed_line_ends() {
        let lf = std::str::from_utf8(HTTPX_BODY)
            .unwrap()
            .replace("\r\n", "\n");
        assert_eq!(search(lf.as_bytes(), B, "model"), found("whisper-1"));
        assert_eq!(search(lf.as_bytes(), B, "file"), FieldSearch::Absent);
        let lf = std::str::from_utf8(HTTPX_FIELDS)
            .unwrap()
            .replace("\r\n", "\n");
        assert_eq!(search(lf.as_bytes(), B2, "language"), found("en"));
        let mixed = format!(
            "--{B}\nContent-Disposition: form-data; name=\"x\"\r\n\n1\r\n--{B}\r\nContent-Disposition: form-data; name=\"model\"\n\r\nm\n--{B}--"
        );
        assert_eq!(search(mixed.as_bytes(), B, "model"), found("m"));
        assert_eq!(search(mixed.as_bytes(), B, "x"), found("1"));
    }

    #[test]
    fn header_forms() {
        for header in [
            "Content-Disposition: form-data; name=\"model\"",
            "content-disposition: form-data; name=\"model\"",
            "CONTENT-DISPOSITION:FORM-DATA;NAME=model",
            "Content-Disposition : form-data ;  name = model ",
            "Content-Disposition: form-data; name=model; x=1",
            "Content-Disposition: form-data; name=\"mo\\del\"",
            "Content-Disposition: form-data; x=\"a;name=no\"; name=\"model\"",
            "Content-Disposition: form-data; name=\"other\"; name=\"model\"",
            "Content-Disposition: form-data;; name=model",
            "Content-Disposition: form-data; =x; name=model",
            "Content-Type: text/plain\r\nContent-Disposition: form-data; name=\"model\"\r\nX-Other: 1",
            "X-Other: no colon\r\nnot a header\r\nContent-Disposition: form-data; name=\"model\"",
        ] {
            let mut body = part(header, "gpt-4o");
            body += &close();
            assert_eq!(
                search(body.as_bytes(), B, "model"),
                found("gpt-4o"),
                "{header}"
            );
        }
        // A later Content-Disposition replaces an earlier one.
        let mut body = part(
            "Content-Disposition: form-data; name=\"model\"\r\nContent-Disposition: form-data; name=\"x\"",
            "v",
        );
        body += &close();
        assert_eq!(search(body.as_bytes(), B, "model"), FieldSearch::Absent);
        // Names with quotes, escaped.
        let mut body = part("Content-Disposition: form-data; name=\"a\\\"b\"", "q");
        body += &close();
        assert_eq!(search(body.as_bytes(), B, "a\"b"), found("q"));
        assert_eq!(search(body.as_bytes(), B, "a\\\"b"), FieldSearch::Absent);
        assert_eq!(search(body.as_bytes(), B, "a"), FieldSearch::Absent);
    }

    #[test]
    fn empty_values() {
        let mut body = part("Content-Disposition: form-data; name=\"model\"", "");
        body += &close();
        assert_eq!(search(body.as_bytes(), B, "model"), found(""));
        // No line end of its own: the delimiter follows the blank line at once.
        let body =
            format!("--{B}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n--{B}--\r\n");
        assert_eq!(search(body.as_bytes(), B, "model"), found(""));
        let body = format!(
            "--{B}\nContent-Disposition: form-data; name=\"a\"\n\n--{B}\nContent-Disposition: form-data; name=\"model\"\n\nm\n--{B}--"
        );
        assert_eq!(search(body.as_bytes(), B, "model"), found("m"));
        // A lone carriage return.
        let body = format!("--{B}\nContent-Disposition: form-data; name=\"model\"\n\n\r\n--{B}--");
        assert_eq!(search(body.as_bytes(), B, "model"), found(""));
        let body =
            format!("--{B}\nContent-Disposition: form-data; name=\"model\"\n\n\r\r\n--{B}--");
        assert_eq!(search(body.as_bytes(), B, "model"), found("\r"));
    }

    #[test]
    fn unfinished_bodies() {
        // Headers that never end, and bodies that never reach a delimiter.
        let body = format!("--{B}\r\nContent-Disposition: form-data; name=\"model\"\r\n");
        assert_eq!(
            find_field(body.as_bytes(), B, "model"),
            FieldSearch::NeedMore
        );
        assert_eq!(find_field(b"", B, "model"), FieldSearch::NeedMore);
        assert_eq!(
            find_field(b"no delimiter here", B, "model"),
            FieldSearch::NeedMore
        );
        let body = format!("--{B}");
        assert_eq!(
            find_field(body.as_bytes(), B, "model"),
            FieldSearch::NeedMore
        );
        let body = format!("--{B}-");
        assert_eq!(
            find_field(body.as_bytes(), B, "model"),
            FieldSearch::NeedMore
        );
        let body = format!("--{B}\r");
        assert_eq!(
            find_field(body.as_bytes(), B, "model"),
            FieldSearch::NeedMore
        );
        let body = format!("--{B}   ");
        assert_eq!(
            find_field(body.as_bytes(), B, "model"),
            FieldSearch::NeedMore
        );
    }

    #[test]
    fn helpers() {
        assert_eq!(quoted_end(b"abc\"x"), Some(3));
        assert_eq!(quoted_end(b"a\\\"c\"x"), Some(4));
        assert_eq!(quoted_end(b"abc\\"), None);
        assert_eq!(quoted_end(b"abc"), None);
        assert!(unquoted_eq(b"a\\bc", b"abc"));
        assert!(!unquoted_eq(b"abc\\", b"abc"));
        assert!(!unquoted_eq(b"ab", b"abc"));
        assert!(!unquoted_eq(b"abcd", b"abc"));
        assert!(unquoted_eq(b"", b""));
        assert_eq!(tail(b"x", 1), Tail::NeedMore);
        assert_eq!(tail(b"x-", 1), Tail::NeedMore);
        assert_eq!(tail(b"x--", 1), Tail::Close);
        assert_eq!(tail(b"x-a", 1), Tail::No);
        assert_eq!(tail(b"x \t", 1), Tail::NeedMore);
        assert_eq!(tail(b"x \r", 1), Tail::NeedMore);
        assert_eq!(tail(b"x \r\n", 1), Tail::Part(4));
        assert_eq!(tail(b"x\n", 1), Tail::Part(2));
        assert_eq!(tail(b"x\rx", 1), Tail::No);
        assert_eq!(tail(b"xy", 1), Tail::No);
        assert_eq!(
            disposition(b" form-data; name=\"m\"; filename=\"f\"", b"m"),
            PartHeaders {
                named: true,
                file: true
            }
        );
        assert_eq!(disposition(b"", b"m"), PartHeaders::default());
        assert_eq!(
            disposition(b"attachment; name=m", b"m"),
            PartHeaders::default()
        );
    }
}

#[cfg(test)]
mod range_tests {
    use super::*;

    #[test]
    fn the_range_is_the_values_bytes() {
        let body = b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nmodel\r\n--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF";
        let RangeSearch::Found(r) = find_field_range(body, "b", "model") else {
            panic!("not found");
        };
        assert_eq!(&body[r.clone()], b"whisper-1");
        // Splicing a longer name there keeps the parts intact.
        let mut renamed = body[..r.start].to_vec();
        renamed.extend_from_slice(b"whisper-west");
        renamed.extend_from_slice(&body[r.end..]);
        assert_eq!(
            find_field(&renamed, "b", "model"),
            FieldSearch::Found("whisper-west".into())
        );
        // An empty value is an empty range at its place.
        let empty = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n\r\n--b--";
        let RangeSearch::Found(r) = find_field_range(empty, "b", "model") else {
            panic!("not found");
        };
        assert!(r.is_empty());
        assert_eq!(r.start, empty.len() - "\r\n--b--".len());
        assert_eq!(
            find_field_range(&body[..60], "b", "model"),
            RangeSearch::NeedMore
        );
        // An empty value whose delimiter follows the headers' blank line at once.
        let bare = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n--b--";
        assert_eq!(
            find_field(bare, "b", "model"),
            FieldSearch::Found(String::new())
        );
        // A quoted parameter before the name (and before the boundary).
        let quoted =
            b"--b\r\nContent-Disposition: form-data; x=\"1;2\"; name=\"model\"\r\n\r\ngpt\r\n--b--";
        assert_eq!(
            find_field(quoted, "b", "model"),
            FieldSearch::Found("gpt".into())
        );
        assert_eq!(
            boundary("multipart/form-data; charset=\"utf-8\"; boundary=xyz"),
            Some("xyz")
        );
        assert_eq!(
            find_field_range(b"--b--", "b", "model"),
            RangeSearch::Absent
        );
    }
}
