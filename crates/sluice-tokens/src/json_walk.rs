//! The JSON walk shared by the hand-written readers of the hot path (streamed events, chat
//! bodies): a cursor over the bytes that checks what it walks at least as strictly as serde_json
//! does, and gives up (`None`) on anything malformed, so that its caller can leave the input to
//! serde. Strings are scanned eight bytes at a time.

/// The deepest nesting walked; deeper events go to serde (whose limit is 128).
pub(crate) const MAX_DEPTH: u32 = 64;

/// Bytes that end a run of plain string bytes: the quote, the backslash and control characters.
static STRING_STOP: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

const ONES: u64 = u64::from_le_bytes([1; 8]);
const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);

/// The high bit of each byte of `x` that is below `n` (n <= 0x80); exact for the lowest such
/// byte, which is all that is read.
fn below(x: u64, n: u8) -> u64 {
    x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS
}

/// The high bit of each byte of the eight bytes `word` that is a quote or a backslash (or, with
/// `control`, a control character); exact for the first such byte.
fn stops(word: &[u8], control: bool) -> u64 {
    let x = u64::from_le_bytes(word.try_into().unwrap_or_default());
    let quotes = below(x ^ (ONES * u64::from(b'"')), 1) | below(x ^ (ONES * u64::from(b'\\')), 1);
    if control {
        quotes | below(x, 0x20)
    } else {
        quotes
    }
}

/// How many bytes at the start of `b` are plain string bytes (no quote, backslash or control
/// character): eight at a time, then one by one.
#[inline]
pub(crate) fn plain_run(b: &[u8]) -> usize {
    let mut i = 0;
    while let Some(word) = b.get(i..i + 8) {
        let stops = stops(word, true);
        if stops != 0 {
            return i + (stops.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while b.get(i).is_some_and(|&c| !STRING_STOP[usize::from(c)]) {
        i += 1;
    }
    i
}

/// Where the first quote or backslash in `b` is: the first 16 bytes eight at a time (most strings
/// of a JSON answer end there), the rest with `memchr2`.
pub(crate) fn quote_or_backslash(b: &[u8]) -> Option<usize> {
    for at in [0, 8] {
        let Some(word) = b.get(at..at + 8) else {
            return b[at..]
                .iter()
                .position(|&c| c == b'"' || c == b'\\')
                .map(|p| at + p);
        };
        let stops = stops(word, false);
        if stops != 0 {
            return Some(at + (stops.trailing_zeros() / 8) as usize);
        }
    }
    memchr::memchr2(b'"', b'\\', &b[16..]).map(|p| 16 + p)
}

/// Marks which members of an object were seen, so a repeated one is noticed.
#[derive(Default)]
pub(crate) struct Seen(u8);

impl Seen {
    /// `None` when member `bit` was seen before.
    pub(crate) fn first(&mut self, bit: u8) -> Option<()> {
        if self.0 & bit != 0 {
            return None;
        }
        self.0 |= bit;
        Some(())
    }
}

pub(crate) struct Reader<'a> {
    pub(crate) b: &'a [u8],
    pub(crate) i: usize,
    pub(crate) depth: u32,
}

impl<'a> Reader<'a> {
    /// A cursor at the start of `b`.
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Self { b, i: 0, depth: 0 }
    }

    /// Whether only whitespace is left.
    pub(crate) fn at_end(&mut self) -> bool {
        self.ws();
        self.i == self.b.len()
    }

    pub(crate) fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    /// The next byte after whitespace, left in place.
    #[inline]
    pub(crate) fn peek(&mut self) -> Option<u8> {
        // Compact JSON has no whitespace between tokens.
        match self.b.get(self.i) {
            Some(&c) if c > b' ' => Some(c),
            _ => {
                self.ws();
                self.b.get(self.i).copied()
            }
        }
    }

    pub(crate) fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    pub(crate) fn null(&mut self) -> Option<()> {
        self.ws();
        self.literal(b"null")
    }

    pub(crate) fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then(|| self.i += 1)
    }

    /// An object or array at the cursor, opened by `open` and closed by `close`: `item` reads
    /// each member or element.
    pub(crate) fn sequence(
        &mut self,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        if self.peek()? != open {
            return None;
        }
        self.enter()?;
        let mut empty = self.peek()? == close;
        while !empty {
            item(self)?;
            match self.peek()? {
                b',' => self.i += 1,
                c if c == close => empty = true,
                _ => return None,
            }
        }
        self.i += 1;
        self.depth -= 1;
        Some(())
    }

    /// The object at the cursor: each member's key (plain ASCII, no escapes) goes to `member`,
    /// which reads the value.
    pub(crate) fn object(
        &mut self,
        mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<()>,
    ) -> Option<()> {
        self.sequence(b'{', b'}', |r| {
            if r.peek()? != b'"' {
                return None;
            }
            let (key, escaped) = r.string()?;
            if escaped || !key.is_ascii() || r.peek()? != b':' {
                return None;
            }
            r.i += 1;
            member(r, key)
        })
    }

    /// The array at the cursor: `element` reads each element.
    pub(crate) fn array(&mut self, element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.sequence(b'[', b']', element)
    }

    /// The string at the cursor (its opening quote): its raw bytes between the quotes, and
    /// whether they hold escapes. Escapes are checked as serde_json checks them; the bytes are
    /// not checked for UTF-8 (serde_json does not check a string it skips either).
    #[inline]
    pub(crate) fn string(&mut self) -> Option<(&'a [u8], bool)> {
        let start = self.i + 1;
        // Most strings (keys above all) are plain up to their closing quote: that case is
        // inlined where strings are read; escapes and errors take the loop below.
        let rest = self.b.get(start..)?;
        let plain = plain_run(rest);
        if rest.get(plain) == Some(&b'"') {
            self.i = start + plain + 1;
            return Some((&rest[..plain], false));
        }
        self.string_from(start, start + plain)
    }

    /// [`Reader::string`] from `i`, the first stop byte of the string opened at `start - 1`.
    fn string_from(&mut self, start: usize, mut i: usize) -> Option<(&'a [u8], bool)> {
        let mut escaped = false;
        loop {
            i += plain_run(self.b.get(i..)?);
            let c = *self.b.get(i)?;
            match c {
                b'"' => {
                    self.i = i + 1;
                    return Some((&self.b[start..i], escaped));
                }
                b'\\' => {
                    escaped = true;
                    i += match *self.b.get(i + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => 2,
                        b'u' if self.b.get(i + 2..i + 6)?.iter().all(u8::is_ascii_hexdigit) => 6,
                        _ => return None,
                    };
                }
                _ => return None, // a control character
            }
        }
    }

    /// A number (skipped), with serde_json's grammar.
    pub(crate) fn number(&mut self) -> Option<()> {
        let digits = |i: &mut usize| {
            let from = *i;
            while let Some(b'0'..=b'9') = self.b.get(*i) {
                *i += 1;
            }
            *i > from
        };
        let mut i = self.i;
        if self.b.get(i) == Some(&b'-') {
            i += 1;
        }
        match self.b.get(i)? {
            b'0' => {
                i += 1;
                if let Some(b'0'..=b'9') = self.b.get(i) {
                    return None;
                }
            }
            b'1'..=b'9' => {
                digits(&mut i);
            }
            _ => return None,
        }
        if self.b.get(i) == Some(&b'.') {
            i += 1;
            if !digits(&mut i) {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.b.get(i) {
            i += 1;
            if let Some(b'+' | b'-') = self.b.get(i) {
                i += 1;
            }
            if !digits(&mut i) {
                return None;
            }
        }
        self.i = i;
        Some(())
    }

    /// Any value, checked and skipped.
    pub(crate) fn skip(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(|r, _| r.skip()),
            b'[' => self.array(Self::skip),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// A member that is either `null` or what `read` reads (which refuses any other shape).
    pub(crate) fn nullable<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<Option<T>> {
        if self.peek()? == b'n' {
            self.literal(b"null").map(|()| None)
        } else {
            read(self).map(Some)
        }
    }
}

/// `raw` (a string's bytes between its quotes, already checked) with its escapes resolved;
/// `None` when it has a `\u` escape.
pub(crate) fn unescape(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        out.push(match *rest.as_bytes().get(at + 1)? {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            _ => return None,
        });
        rest = &rest[at + 2..];
    }
    out.push_str(rest);
    Some(out)
}

/// One top-level member of a JSON object body, as [`top_members`] found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopMember {
    /// The bytes of its value (the last one, when it is given more than once).
    pub value: Option<std::ops::Range<usize>>,
    /// It is given more than once.
    pub repeated: bool,
}

/// The top-level members of `body` named `keys`, found in one walk over it.
///
/// `None` when `body` is not one JSON object, or when the walk leaves it to a full parser: a key
/// with an escape or a byte outside ASCII, a wanted value that is not valid UTF-8, nesting past
/// 64, or anything malformed. The whole body is checked as serde_json checks an object whose keys
/// it reads and whose values it skips, or keeps raw (`RawValue`): strings elsewhere are not
/// checked for UTF-8, no string for surrogates, no number for range.
pub fn top_members<const N: usize>(body: &[u8], keys: [&str; N]) -> Option<[TopMember; N]> {
    let mut r = Reader::new(body);
    let mut found: [TopMember; N] = std::array::from_fn(|_| TopMember::default());
    r.object(|r, key| {
        let Some(i) = keys.iter().position(|k| k.as_bytes() == key) else {
            return r.skip();
        };
        r.peek()?;
        let start = r.i;
        r.skip()?;
        // As a raw value must be.
        std::str::from_utf8(&r.b[start..r.i]).ok()?;
        let member = &mut found[i];
        member.repeated |= member.value.is_some();
        member.value = Some(start..r.i);
        Some(())
    })?;
    r.at_end().then_some(found)
}

/// Random JSON for the tests that hold a reader to serde: values with the odd corners of the
/// grammar, objects of chosen keys, and ways to break them.
#[cfg(test)]
pub(crate) mod generate {
    use rand::prelude::*;

    /// A random JSON value, with the odd corners of the grammar.
    pub(crate) fn value(rng: &mut StdRng, depth: u32, out: &mut String) {
        let pick = if depth > 3 {
            rng.random_range(0..6)
        } else {
            rng.random_range(0..8)
        };
        match pick {
            0 => out.push_str("null"),
            1 => out.push_str(["true", "false"][rng.random_range(0..2)]),
            2 => out.push_str(
                [
                    "0",
                    "-0",
                    "12",
                    "-7",
                    "3.25",
                    "1e5",
                    "2E-3",
                    "-0.5e+2",
                    "184467440737095516150",
                    "1e400",
                ][rng.random_range(0..10)],
            ),
            3..=5 => string(rng, out),
            6 => array_of(rng, out, 4, &mut |rng, out| {
                ws(rng, out);
                value(rng, depth + 1, out);
            }),
            _ => {
                out.push('{');
                for i in 0..rng.random_range(0..4) {
                    if i > 0 {
                        out.push(',');
                    }
                    string(rng, out);
                    out.push(':');
                    value(rng, depth + 1, out);
                }
                out.push('}');
            }
        }
    }

    /// An array of fewer than `max` elements, each written by `element`.
    pub(crate) fn array_of(
        rng: &mut StdRng,
        out: &mut String,
        max: usize,
        element: &mut dyn FnMut(&mut StdRng, &mut String),
    ) {
        out.push('[');
        for i in 0..rng.random_range(0..max) {
            if i > 0 {
                out.push(',');
            }
            element(rng, out);
        }
        out.push(']');
    }

    pub(crate) fn string(rng: &mut StdRng, out: &mut String) {
        out.push('"');
        for _ in 0..rng.random_range(0..8) {
            out.push_str(
                [
                    "a",
                    " ",
                    "word",
                    "é",
                    "😀",
                    "\\n",
                    "\\\"",
                    "\\\\",
                    "\\/",
                    "\\t",
                    "\\u00e9",
                    "\\ud83d\\ude00",
                    "content",
                    "delta",
                ][rng.random_range(0..14)],
            );
        }
        out.push('"');
    }

    pub(crate) fn ws(rng: &mut StdRng, out: &mut String) {
        if rng.random_range(0..4) == 0 {
            out.push_str([" ", "\n", "\t", "\r\n "][rng.random_range(0..4)]);
        }
    }

    /// A member `key` whose value is usually of the expected kind (`kinds`), sometimes anything.
    pub(crate) fn member(
        rng: &mut StdRng,
        key: &str,
        out: &mut String,
        expected: impl FnOnce(&mut StdRng, &mut String),
    ) {
        ws(rng, out);
        out.push('"');
        out.push_str(key);
        out.push('"');
        ws(rng, out);
        out.push(':');
        ws(rng, out);
        if rng.random_range(0..8) == 0 {
            value(rng, 2, out);
        } else {
            expected(rng, out);
        }
        ws(rng, out);
    }

    pub(crate) fn object_of(
        rng: &mut StdRng,
        out: &mut String,
        keys: &[&str],
        member_value: &mut dyn FnMut(&mut StdRng, &str, &mut String),
    ) {
        out.push('{');
        let n = rng.random_range(0..=keys.len() + 1);
        for i in 0..n {
            if i > 0 {
                out.push(',');
            }
            // Mostly the keys the reader knows (sometimes twice), else another.
            let key = if rng.random_range(0..5) == 0 {
                ["index", "logprobs", "role", "finish_reason", "x"][rng.random_range(0..5)]
            } else {
                keys[rng.random_range(0..keys.len())]
            };
            let mut v = String::new();
            member_value(rng, key, &mut v);
            member(rng, key, out, |_, out| out.push_str(&v));
        }
        out.push('}');
    }

    pub(crate) fn mutate(rng: &mut StdRng, event: &[u8]) -> Vec<u8> {
        const BYTES: &[u8] = b"\"{}[],:\\ 0123456789.eE+-ntfurl\x01\x1f\xff\xc3";
        let mut b = event.to_vec();
        let at = rng.random_range(0..=b.len());
        let byte = BYTES[rng.random_range(0..BYTES.len())];
        match rng.random_range(0..4) {
            0 if at < b.len() => {
                b.remove(at);
            }
            1 if at < b.len() => b[at] = byte,
            2 => b.insert(at, byte),
            _ => b.truncate(at),
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use rand::prelude::*;

    use super::*;

    /// The word-at-a-time scans find the first stop byte, as a byte-by-byte loop does, at every
    /// length around their word and 16-byte boundaries.
    #[test]
    fn word_scans_find_the_first_stop() {
        const BYTES: &[u8] = b"a \"\\\x01\x1f\x20\x21\x7f\x80\xff\x5b\x5d";
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..20_000 {
            let len = rng.random_range(0..48);
            // Mostly plain bytes, so stops fall at every position.
            let b: Vec<u8> = (0..len)
                .map(|_| match rng.random_range(0..12) {
                    0 => BYTES[rng.random_range(0..BYTES.len())],
                    _ => b'a' + rng.random_range(0..26),
                })
                .collect();
            let plain = b
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                .unwrap_or(b.len());
            assert_eq!(plain_run(&b), plain, "{b:?}");
            let quote = b.iter().position(|&c| c == b'"' || c == b'\\');
            assert_eq!(quote_or_backslash(&b), quote, "{b:?}");
        }
    }

    #[test]
    fn unescaping_resolves_every_short_escape() {
        assert_eq!(
            unescape(r#"a\"b\\c\/d\be\ff\ng\rh\ti\\"#).as_deref(),
            Some("a\"b\\c/d\u{8}e\u{c}f\ng\rh\ti\\")
        );
        assert_eq!(unescape("plain").as_deref(), Some("plain"));
        assert_eq!(unescape(r"\u0041"), None);
    }

    /// The members as serde reads them: keys visited, the wanted values raw, the others skipped.
    fn serde_members(body: &[u8], keys: [&str; 3]) -> Option<[TopMember; 3]> {
        use serde::de::{Deserializer, MapAccess, Visitor};
        struct Members<'k>([&'k str; 3], usize);
        impl<'de> Visitor<'de> for Members<'_> {
            type Value = [TopMember; 3];
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut found: [TopMember; 3] = Default::default();
                while let Some(k) = map.next_key::<String>()? {
                    let Some(i) = self.0.iter().position(|key| *key == k) else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        continue;
                    };
                    let v = map.next_value::<&serde_json::value::RawValue>()?;
                    let start = v.get().as_ptr() as usize - self.1;
                    found[i].repeated |= found[i].value.is_some();
                    found[i].value = Some(start..start + v.get().len());
                }
                Ok(found)
            }
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        let found = de
            .deserialize_map(Members(keys, body.as_ptr() as usize))
            .ok()?;
        de.end().ok()?;
        Some(found)
    }

    /// Generated objects, and each broken: whenever the walk answers, serde finds the same
    /// members, and the walk answers for most valid ones.
    #[test]
    fn top_members_are_found_where_serde_finds_them() {
        use super::generate::{mutate, object_of, value, ws};
        const KEYS: [&str; 3] = ["stream", "model", "stream_options"];
        let mut rng = StdRng::seed_from_u64(23);
        let (mut walked, mut valid) = (0, 0);
        for _ in 0..20_000 {
            let mut body = String::new();
            ws(&mut rng, &mut body);
            object_of(
                &mut rng,
                &mut body,
                &["stream", "model", "stream_options", "messages", "n"],
                &mut |rng, _, out| value(rng, 1, out),
            );
            ws(&mut rng, &mut body);
            let body = body.into_bytes();
            let broken = mutate(&mut rng, &body);
            for b in [&body, &broken] {
                let serde = serde_members(b, KEYS);
                if b == &body && serde.is_some() {
                    valid += 1;
                }
                if let Some(found) = top_members(b, KEYS) {
                    walked += usize::from(b == &body);
                    assert_eq!(Some(found), serde, "{}", String::from_utf8_lossy(b));
                }
            }
        }
        assert!(walked * 10 > valid * 4, "{walked} of {valid}");
        let body =
            br#" {"model":"gpt-4o","stream" : true,"x":[1,{"stream":false}],"stream":"TRUE"} "#;
        let [stream, model, options] = top_members(body, KEYS).expect("walked");
        assert_eq!(&body[stream.value.clone().unwrap()], br#""TRUE""#);
        assert!(stream.repeated);
        assert_eq!(&body[model.value.unwrap()], br#""gpt-4o""#);
        assert!(!model.repeated);
        assert_eq!(options, TopMember::default());
        assert_eq!(
            top_members(br#"{"str\u0065am":true}"#, KEYS),
            None,
            "left to serde"
        );
        assert_eq!(top_members(b"[]", KEYS), None);
    }
}
