//! Token counting with tiktoken's vocabularies, guarded against inputs that make its regex fail.
//!
//! tiktoken-rs embeds the vocabularies in the binary (`include_str!`), so nothing is fetched at
//! run time. Each encoding used is turned once, lazily, into a compact count-only [`Vocab`]
//! (a few MiB instead of tiktoken-rs's ~55 MiB for o200k) shared by all threads afterwards.
//!
//! [`count`] never hands the tokenizer a "run" (stretch of text between two guaranteed piece
//! boundaries, see [`is_piece_boundary`]) longer than [`MAX_RUN`] bytes: such runs are cut. This
//! kept tiktoken's backtracking regex from giving up (about a mebibyte of whitespace followed by
//! a letter made it fail); the DFA pre-tokenizer now used cannot fail, and the cut still bounds
//! the merge work of a single piece. Ordinary text has no run anywhere near that long, so its
//! count is exactly tiktoken's; a cut inside a long run (a huge whitespace block, a long base64
//! blob, a page of CJK text without spaces) may shift the count by a token or so per cut.

use std::sync::OnceLock;

use crate::Encoding;
use crate::vocab::Vocab;

/// The longest stretch of text between guaranteed piece boundaries given to the regex in one piece.
pub(crate) const MAX_RUN: usize = 4096;

/// The shared vocabulary of `encoding`, built on first use.
pub(crate) fn vocab(encoding: Encoding) -> &'static Vocab {
    static O200K: OnceLock<Vocab> = OnceLock::new();
    static CL100K: OnceLock<Vocab> = OnceLock::new();
    let cell = match encoding {
        Encoding::O200kBase => &O200K,
        Encoding::Cl100kBase => &CL100K,
    };
    cell.get_or_init(|| Vocab::build(encoding))
}

/// Counts `text`'s tokens in `encoding` (special-token strings count as ordinary text).
pub(crate) fn count(encoding: Encoding, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let bpe = vocab(encoding);
    if text.len() <= MAX_RUN {
        return bpe.count(text);
    }
    let mut total = 0u64;
    let mut segment_start = 0usize;
    let mut run_start = 0usize;
    let mut prev_is_space = true;
    for (i, c) in text.char_indices() {
        let is_space = c.is_whitespace();
        if is_piece_boundary(prev_is_space, c) {
            run_start = i;
        } else if i - run_start >= MAX_RUN {
            // A run this long has no guaranteed boundary: cut it here (approximate).
            total += bpe.count(&text[segment_start..i]);
            segment_start = i;
            run_start = i;
        }
        prev_is_space = is_space;
    }
    total + bpe.count(&text[segment_start..])
}

/// True when a regex piece always starts at a character `c` whose predecessor is not whitespace
/// (`prev_is_space` false) in both cl100k and o200k: no piece that contains a non-whitespace
/// character continues into following whitespace other than `\r`/`\n` (only the punctuation
/// alternative takes trailing newlines). Splitting the text there does not change the count.
fn is_piece_boundary(prev_is_space: bool, c: char) -> bool {
    !prev_is_space && c != '\r' && c != '\n' && c.is_whitespace()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiktoken(encoding: Encoding) -> &'static tiktoken_rs::CoreBPE {
        match encoding {
            Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        }
    }

    /// tiktoken-rs's own count, unsegmented.
    fn raw(encoding: Encoding, text: &str) -> u64 {
        tiktoken(encoding).encode_ordinary(text).len() as u64
    }

    #[test]
    fn known_values() {
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            assert_eq!(count(enc, ""), 0);
            assert_eq!(count(enc, "hello world"), 2);
        }
        assert_eq!(
            tiktoken(Encoding::Cl100kBase).encode_ordinary("hello world"),
            vec![15339, 1917]
        );
        assert_eq!(
            tiktoken(Encoding::O200kBase).encode_ordinary("hello world"),
            vec![24912, 2375]
        );
        // The cookbook's example sentence.
        assert_eq!(
            count(Encoding::Cl100kBase, "Hello world, let's test tiktoken."),
            9
        );
    }

    #[test]
    fn long_ordinary_text_counts_exactly_like_tiktoken() {
        let mut text = String::new();
        let samples = [
            "The quick brown fox jumps over the lazy dog. ",
            "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n\n",
            "Ünïcödé wörds, naïve café — “quotes” and 'apostrophes' aren't rare!\r\n",
            "数字 12345678 and\ttabs\t\tand  double  spaces   here.\n",
            "😀 emoji 🎉 sequences 👨‍👩‍👧 mixed with text; ",
        ];
        let mut i = 0;
        while text.len() < 5 * MAX_RUN {
            text.push_str(samples[i % samples.len()]);
            i += 1;
        }
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            assert_eq!(count(enc, &text), raw(enc, &text));
        }
    }

    #[test]
    fn splitting_at_boundaries_is_exact() {
        // Every boundary the splitter may use leaves the total unchanged.
        let text = "Hi!\n  there,\tyou\u{a0}x ab/ c's  d\r\n e 12345 f\u{2003}g";
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            let whole = raw(enc, text);
            let mut prev_is_space = true;
            for (i, c) in text.char_indices() {
                if is_piece_boundary(prev_is_space, c) {
                    let split = raw(enc, &text[..i]) + raw(enc, &text[i..]);
                    assert_eq!(split, whole, "split at {i} in {enc:?}");
                }
                prev_is_space = c.is_whitespace();
            }
        }
    }

    #[test]
    fn long_runs_are_cut_and_stay_close() {
        let cjk = "东京都の天気は晴れです".repeat(2000);
        let b64 = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODkrLw".repeat(500);
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            for text in [&cjk, &b64] {
                let exact = raw(enc, text);
                let cut = count(enc, text);
                let cuts = (text.len() / MAX_RUN) as u64 + 1;
                assert!(
                    cut.abs_diff(exact) <= 2 * cuts,
                    "{enc:?}: {cut} vs {exact} ({cuts} cuts)"
                );
            }
        }
    }

    #[test]
    fn whitespace_flood_does_not_panic() {
        // Unsegmented, tiktoken panics on this (regex backtrack limit).
        let text = format!("{}a", " ".repeat((1 << 20) + 1));
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            let n = count(enc, &text);
            assert!(n > 0 && n < 20_000, "{enc:?}: {n}");
        }
    }
}
