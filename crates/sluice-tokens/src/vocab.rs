//! A compact, count-only form of a tiktoken vocabulary.
//!
//! tiktoken-rs's `CoreBPE` keeps two hash maps of owned byte vectors (token to rank and back),
//! a sorted copy of every token and 128 clones of its regex: about 55 MiB resident for o200k.
//! Counting needs much less: the rank of a byte string, and the same pre-tokenising regex. Here
//! every token's bytes sit in one buffer, indexed by rank, and an open-addressing table of ranks
//! finds a byte string's rank: about 6 MiB for o200k, 3 MiB for cl100k.
//!
//! The table is filled from tiktoken-rs's own vocabulary (built once, read rank by rank, then
//! dropped), so the ranks are exactly tiktoken's. Counting follows tiktoken's `encode_ordinary`:
//! the regex splits the text into pieces; a piece that is a token counts one; any other piece is
//! merged byte pair by byte pair, always merging the adjacent pair of lowest rank (the leftmost
//! of equals), and counts the parts left. The unit tests compare the counts with tiktoken-rs.

use std::cell::RefCell;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};

use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input};

use crate::Encoding;

/// No rank (a pair that is not a token).
const EMPTY: u32 = u32::MAX;

/// A free slot of the rank table.
const FREE: u64 = u64::MAX;

/// Pieces up to this many bytes are merged on the stack ([`Vocab::small_piece_tokens`]).
const SMALL_PIECE: usize = 32;

/// Pieces of 2 to this many bytes have their counts remembered per thread ([`PieceCache`]).
const CACHED_PIECE: usize = 16;

/// Entries of each thread's [`PieceCache`] (a power of two): 96 KiB.
const PIECE_SLOTS: usize = 4096;

/// Tells vocabularies apart in the per-thread cache.
static NEXT_VOCAB_ID: AtomicU32 = AtomicU32::new(1);

/// One remembered piece: its bytes (zero-padded to 16), its vocabulary and length, its count.
#[derive(Clone, Copy, Default)]
struct CachedPiece {
    lo: u64,
    hi: u64,
    /// `vocab id << 8 | length`; 0 for an empty entry (lengths are at least 2).
    tag: u32,
    count: u32,
}

/// The counts of short pieces recently counted on this thread, direct-mapped.
///
/// New prompts are mostly made of words seen before: a word's count is then read from here
/// (one comparison of 16 bytes held in the entry) instead of looked up in the rank table, whose
/// megabytes are rarely in the CPU's caches between requests. Entries hold the piece's bytes,
/// so a hit is always the same piece of the same vocabulary: counts stay exact.
struct PieceCache {
    slots: Box<[CachedPiece]>,
}

impl PieceCache {
    fn new(slots: usize) -> PieceCache {
        PieceCache {
            slots: vec![CachedPiece::default(); slots].into_boxed_slice(),
        }
    }
}

thread_local! {
    static PIECES: RefCell<Option<PieceCache>> = const { RefCell::new(None) };
}

/// A piece of 2 to [`CACHED_PIECE`] bytes as two words and a tag.
fn pack(vocab_id: u32, piece: &[u8]) -> (u64, u64, u32) {
    let mut b = [0u8; CACHED_PIECE];
    b[..piece.len()].copy_from_slice(piece);
    let (lo, hi) = b.split_at(8);
    let word = |w: &[u8]| u64::from_le_bytes(w.try_into().unwrap_or_default());
    (word(lo), word(hi), vocab_id << 8 | piece.len() as u32)
}

// The pre-tokenising patterns, tiktoken's, in a form the `regex` crate runs (a DFA, no
// backtracking): it has no look-ahead, so tiktoken's `\s+(?!\S)` (a whitespace run, less its last
// character when a non-space follows) becomes `\s+$` (a run at the end of the text) and `\s+\s`
// (a run of two or more followed by a non-space), whose match [`Vocab::count`] shortens by its
// last character. cl100k's possessive quantifiers (`?+`, `++`, `{1,3}+`) become greedy ones:
// no backtracking into them could make the rest match, so the pieces are the same.

/// o200k.
const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"|\s*[\r\n]+",
    r"|\s+$|\s+\s",
    r"|\s+"
);

/// cl100k.
const CL100K_PATTERN: &str = concat!(
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s+$|\s*[\r\n]|\s+\s|\s"
);

/// One encoding's ranks and pattern.
pub(crate) struct Vocab {
    /// Every token's bytes, in rank order.
    bytes: Vec<u8>,
    /// `ends[r]`: where rank `r`'s bytes end in `bytes` (they start at `ends[r - 1]`, or 0).
    ends: Vec<u32>,
    /// Ranks by hash of their bytes (linear probing). A slot holds the upper half of its token's
    /// hash above the rank, so that most probes for a byte string that is not a token (most of
    /// a merge's lookups) are answered without reading any token's bytes; [`FREE`] marks a free
    /// slot.
    table: Vec<u64>,
    regex: Regex,
    /// This vocabulary's key in the per-thread [`PieceCache`].
    id: u32,
}

impl std::fmt::Debug for Vocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vocab")
            .field("tokens", &self.ends.len())
            .field("bytes", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

/// The upper half of a hash, in a table slot's upper half.
fn fingerprint(h: usize) -> u64 {
    (h as u64) & !u64::from(u32::MAX)
}

fn hash(bytes: &[u8]) -> usize {
    let mut h = rustc_hash::FxBuildHasher.build_hasher();
    h.write(bytes);
    h.finish() as usize
}

/// Where a piece matched at `start..end` really ends: a match of `\s+\s` (two or more
/// whitespace characters, not at the end of the text, not ending in a line break; no other
/// alternative matches such a run) gives back its last character, as tiktoken's `\s+(?!\S)`
/// leaves it to the next piece.
fn shorten_space_run(text: &str, start: usize, end: usize) -> usize {
    if end == text.len() {
        return end;
    }
    let piece = &text[start..end];
    let mut chars = piece.chars();
    let Some(last) = chars.next_back() else {
        return end;
    };
    let two_or_more = chars.clone().next().is_some();
    if two_or_more
        && last != '\n'
        && last != '\r'
        && last.is_whitespace()
        && chars.all(char::is_whitespace)
    {
        end - last.len_utf8()
    } else {
        end
    }
}

impl Vocab {
    /// Builds `encoding`'s vocabulary from tiktoken-rs's (which is dropped again).
    pub(crate) fn build(encoding: Encoding) -> Vocab {
        let (core, pattern) = match encoding {
            Encoding::O200kBase => (tiktoken_rs::o200k_base(), O200K_PATTERN),
            Encoding::Cl100kBase => (tiktoken_rs::cl100k_base(), CL100K_PATTERN),
        };
        let core = core.expect("tiktoken-rs builds its embedded vocabularies");
        // The mergeable ranks are 0..n without a gap; the special tokens come after a gap.
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        while let Ok(token) = core.decode_bytes(&[ends.len() as u32]) {
            bytes.extend_from_slice(&token);
            ends.push(bytes.len() as u32);
        }
        drop(core);
        bytes.shrink_to_fit();
        ends.shrink_to_fit();
        Vocab::from_tokens(bytes, ends, pattern)
    }

    fn from_tokens(bytes: Vec<u8>, ends: Vec<u32>, pattern: &str) -> Vocab {
        // At most half full: short probe sequences.
        let slots = (ends.len() * 2).next_power_of_two().max(16);
        let mut v = Vocab {
            bytes,
            ends,
            table: vec![FREE; slots],
            regex: Regex::new(pattern).expect("the tokenizer patterns compile"),
            id: NEXT_VOCAB_ID.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff,
        };
        for rank in 0..v.ends.len() as u32 {
            let mask = v.table.len() - 1;
            let h = hash(v.token(rank));
            let mut i = h & mask;
            while v.table[i] != FREE {
                i = (i + 1) & mask;
            }
            v.table[i] = fingerprint(h) | u64::from(rank);
        }
        v
    }

    fn token(&self, rank: u32) -> &[u8] {
        let r = rank as usize;
        let start = if r == 0 { 0 } else { self.ends[r - 1] as usize };
        &self.bytes[start..self.ends[r] as usize]
    }

    /// The rank of `piece`, if it is a token.
    pub(crate) fn rank(&self, piece: &[u8]) -> Option<u32> {
        let mask = self.table.len() - 1;
        let h = hash(piece);
        let fp = fingerprint(h);
        let mut i = h & mask;
        loop {
            let slot = self.table[i];
            if slot == FREE {
                return None;
            }
            if slot & !u64::from(u32::MAX) == fp {
                let r = slot as u32;
                if self.token(r) == piece {
                    return Some(r);
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Tokens of `text` as tiktoken's `encode_ordinary` would produce them.
    pub(crate) fn count(&self, text: &str) -> u64 {
        PIECES.with(|cell| match cell.try_borrow_mut() {
            Ok(mut cache) => {
                let cache = cache.get_or_insert_with(|| PieceCache::new(PIECE_SLOTS));
                self.count_with(text, Some(cache))
            }
            // Not reached (counting does not nest), but never a panic.
            Err(_) => self.count_with(text, None),
        })
    }

    /// A piece's count, from `cache` when it is there, else counted and kept there.
    fn cached_piece_tokens(&self, cache: &mut PieceCache, piece: &[u8]) -> usize {
        let (lo, hi, tag) = pack(self.id, piece);
        let mix = (lo ^ hi.rotate_left(23) ^ u64::from(tag)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let index = (mix >> 32) as usize & (cache.slots.len() - 1);
        let slot = &mut cache.slots[index];
        if slot.tag == tag && slot.lo == lo && slot.hi == hi {
            return slot.count as usize;
        }
        let count = self.piece_tokens(piece);
        *slot = CachedPiece {
            lo,
            hi,
            tag,
            count: count as u32,
        };
        count
    }

    /// [`Vocab::count`], with or without the per-thread cache of piece counts.
    fn count_with(&self, text: &str, mut cache: Option<&mut PieceCache>) -> u64 {
        let mut total = 0u64;
        let mut at = 0usize;
        while at < text.len() {
            // Every character starts some alternative, so the next piece starts where the last
            // one ended: an anchored search (forward only). Should a character ever match
            // nothing, it is skipped, as tiktoken skips it.
            let input = Input::new(text).range(at..);
            let m = match self.regex.search(&input.clone().anchored(Anchored::Yes)) {
                Some(m) => m,
                None => match self.regex.search(&input) {
                    Some(m) => m,
                    None => break,
                },
            };
            if m.is_empty() {
                break;
            }
            let end = shorten_space_run(text, m.start(), m.end());
            let piece = &text.as_bytes()[m.start()..end];
            total += match cache.as_deref_mut() {
                Some(cache) if (2..=CACHED_PIECE).contains(&piece.len()) => {
                    self.cached_piece_tokens(cache, piece)
                }
                _ => self.piece_tokens(piece),
            } as u64;
            at = end;
        }
        total
    }

    /// [`Vocab::piece_tokens`] for a piece of at most [`SMALL_PIECE`] bytes (nearly all): the same
    /// merges on arrays on the stack, the lowest pair found by a scan.
    fn small_piece_tokens(&self, piece: &[u8]) -> usize {
        let n = piece.len();
        // starts[..=parts]: part boundaries; ranks[k]: part k merged with part k + 1.
        let mut starts = [0u8; SMALL_PIECE + 1];
        let mut ranks = [EMPTY; SMALL_PIECE];
        for (i, s) in starts.iter_mut().enumerate().take(n + 1) {
            *s = i as u8;
        }
        let mut parts = n;
        let pair = |starts: &[u8], parts: usize, k: usize| -> u32 {
            if k + 1 >= parts {
                return EMPTY;
            }
            self.rank(&piece[starts[k] as usize..starts[k + 2] as usize])
                .unwrap_or(EMPTY)
        };
        for (k, r) in ranks.iter_mut().enumerate().take(parts - 1) {
            *r = pair(&starts, parts, k);
        }
        loop {
            let mut best = EMPTY;
            let mut at = 0;
            for (k, &r) in ranks[..parts - 1].iter().enumerate() {
                if r < best {
                    best = r;
                    at = k;
                }
            }
            if best == EMPTY {
                return parts;
            }
            // Merge part `at` with the next: drop boundary at + 1.
            starts.copy_within(at + 2..=parts, at + 1);
            ranks.copy_within(at + 1..parts - 1, at);
            parts -= 1;
            if parts == 1 {
                return 1;
            }
            ranks[at] = pair(&starts, parts, at);
            if at > 0 {
                ranks[at - 1] = pair(&starts, parts, at - 1);
            }
        }
    }

    /// Tokens of one regex piece.
    ///
    /// The parts form a linked list over their start offsets; a heap holds every adjacent pair
    /// that is a token, by (rank, start), so the next merge is always the lowest rank and the
    /// leftmost of equals, as in tiktoken. Entries left stale by a merge are skipped when
    /// popped. O(n log n) for a piece of n bytes.
    fn piece_tokens(&self, piece: &[u8]) -> usize {
        if piece.len() <= 1 || self.rank(piece).is_some() {
            return piece.len().min(1);
        }
        if piece.len() <= SMALL_PIECE {
            return self.small_piece_tokens(piece);
        }
        self.large_piece_tokens(piece)
    }

    /// [`Vocab::piece_tokens`] for a piece of two bytes or more that is not a token itself.
    fn large_piece_tokens(&self, piece: &[u8]) -> usize {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let n = piece.len();
        // next[i]: where the part starting at i ends (n for the last); prev[i]: the part before.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        // pair[i]: the rank of the part at i merged with the following part, if a token.
        let mut pair = vec![EMPTY; n];
        let mut heap = BinaryHeap::with_capacity(n);
        let rank_at = |next: &[usize], i: usize| -> u32 {
            let mid = next[i];
            if mid >= n {
                return EMPTY;
            }
            self.rank(&piece[i..next[mid]]).unwrap_or(EMPTY)
        };
        for (i, p) in pair.iter_mut().enumerate().take(n - 1) {
            *p = rank_at(&next, i);
            if *p != EMPTY {
                heap.push(Reverse((*p, i)));
            }
        }
        let mut parts = n;
        while let Some(Reverse((rank, i))) = heap.pop() {
            if pair[i] != rank {
                continue; // stale: the part at i changed since
            }
            // Merge the part at i with the next one.
            let gone = next[i];
            next[i] = next[gone];
            if next[i] < n {
                prev[next[i]] = i;
            }
            pair[gone] = EMPTY;
            parts -= 1;
            pair[i] = rank_at(&next, i);
            if pair[i] != EMPTY {
                heap.push(Reverse((pair[i], i)));
            }
            let p = prev[i];
            if p < n {
                pair[p] = rank_at(&next, p);
                if pair[p] != EMPTY {
                    heap.push(Reverse((pair[p], p)));
                }
            }
        }
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of `tokens`, ranked in their order, split on whitespace.
    fn vocab_of(tokens: &[&[u8]]) -> Vocab {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for t in tokens {
            bytes.extend_from_slice(t);
            ends.push(bytes.len() as u32);
        }
        Vocab::from_tokens(bytes, ends, r"\S+|\s+")
    }

    fn tiny() -> Vocab {
        // Single bytes, then merges: "ab" (rank 3), "bc" (4), "abc" (5).
        vocab_of(&[b"a", b"b", b"c", b"ab", b"bc", b"abc"])
    }

    #[test]
    fn ranks_are_found_by_bytes() {
        let v = tiny();
        assert_eq!(v.rank(b"a"), Some(0));
        assert_eq!(v.rank(b"bc"), Some(4));
        assert_eq!(v.rank(b"abc"), Some(5));
        assert_eq!(v.rank(b"ca"), None);
        assert_eq!(v.rank(b""), None);
        assert_eq!(v.token(0), b"a");
        assert_eq!(v.token(5), b"abc");
    }

    #[test]
    fn merges_lowest_rank_first() {
        let v = tiny();
        // A whole token: one.
        assert_eq!(v.piece_tokens(b"abc"), 1);
        // "abca": ab(3) before bc(4): ab|c|a -> abc(5)|a: two.
        assert_eq!(v.piece_tokens(b"abca"), 2);
        // "bcab": bc(4) and ab(3): ab first -> bc|ab... b|c|ab -> bc|ab: two.
        assert_eq!(v.piece_tokens(b"bcab"), 2);
        // "cab": ab -> c|ab: two; "cc": no pair: two.
        assert_eq!(v.piece_tokens(b"cab"), 2);
        assert_eq!(v.piece_tokens(b"cc"), 2);
        assert_eq!(v.piece_tokens(b"a"), 1);
        assert_eq!(v.piece_tokens(b""), 0);
        // Pieces from the regex: "abc" + " " + "cc".
        assert_eq!(v.count("abc cc"), 4);
        assert_eq!(v.count(""), 0);
    }

    #[test]
    fn equal_ranks_merge_leftmost_first() {
        // "aaab" has "aa" at 0 and at 1. Leftmost first: aa|a|b, then "ab": aa|ab, two.
        // Rightmost first would leave a|aa|b ("aaa" and "aab" are not tokens): three.
        let tokens: [&[u8]; 4] = [b"a", b"b", b"aa", b"ab"];
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for t in tokens {
            bytes.extend_from_slice(t);
            ends.push(bytes.len() as u32);
        }
        let v = Vocab::from_tokens(bytes, ends, r"\S+");
        assert_eq!(v.piece_tokens(b"aaab"), 2);
        assert_eq!(v.piece_tokens(b"aaa"), 2);
    }

    #[test]
    fn remembered_piece_counts_are_exact_whatever_the_cache_size() {
        use rand::prelude::*;
        let v = tiny();
        // "ab" is not a token here: the same pieces count differently.
        let other = vocab_of(&[b"a", b"b", b"c", b"bc", b"abc"]);
        assert_ne!(v.id, other.id);
        let mut rng = StdRng::seed_from_u64(11);
        // One slot (every piece evicts the last), a few, and the real size.
        for slots in [1, 4, PIECE_SLOTS] {
            let mut cache = PieceCache::new(slots);
            for _ in 0..400 {
                let text: String = (0..rng.random_range(0..40))
                    .map(|_| ['a', 'b', 'c', ' '][rng.random_range(0..4)])
                    .collect();
                for vocab in [&v, &other] {
                    let plain = vocab.count_with(&text, None);
                    assert_eq!(vocab.count_with(&text, Some(&mut cache)), plain, "{text:?}");
                    // Again, now from the cache.
                    assert_eq!(vocab.count_with(&text, Some(&mut cache)), plain, "{text:?}");
                    assert_eq!(vocab.count(&text), plain, "{text:?}");
                }
            }
        }
        // Distinct pieces spread over the slots (few collide), so a text's
        // words stay remembered together.
        let mut cache = PieceCache::new(PIECE_SLOTS);
        let mut pieces = std::collections::HashSet::new();
        while pieces.len() < 300 {
            let piece: String = (0..rng.random_range(2..=CACHED_PIECE))
                .map(|_| ['a', 'b', 'c'][rng.random_range(0..3)])
                .collect();
            pieces.insert(piece);
        }
        for piece in &pieces {
            v.count_with(piece, Some(&mut cache));
        }
        let kept = cache.slots.iter().filter(|s| s.tag != 0).count();
        assert!(kept >= 270, "{kept} of 300 pieces kept");
        // The two vocabularies share a slot's piece without mixing counts.
        let mut cache = PieceCache::new(1);
        assert_eq!(v.count_with("aba", Some(&mut cache)), 2);
        assert_eq!(other.count_with("aba", Some(&mut cache)), 3);
        assert_eq!(v.count_with("aba", Some(&mut cache)), 2);
        // Sixteen bytes are remembered; seventeen are not (and count the same).
        let long = "abc".repeat(6);
        for piece in [&long[..16], &long[..17]] {
            let mut cache = PieceCache::new(PIECE_SLOTS);
            let plain = v.count_with(piece, None);
            assert_eq!(v.count_with(piece, Some(&mut cache)), plain);
            let kept = cache.slots.iter().filter(|s| s.tag != 0).count();
            assert_eq!(kept, usize::from(piece.len() == 16), "{piece}");
        }
    }

    /// Random texts of every kind the regexes treat differently, counted both ways.
    #[test]
    fn counts_equal_tiktoken_on_varied_text() {
        use rand::prelude::*;
        let pieces: &[&str] = &[
            "hello",
            "World",
            "HTTP",
            "naïve",
            "café",
            "Ünïcödé",
            "東京都",
            "の天気",
            "😀",
            "👨‍👩‍👧",
            "🎉🎉",
            " ",
            "  ",
            "   ",
            "\t",
            "\n",
            "\r\n",
            "\n\n",
            " \n ",
            "'s",
            "'T",
            "'re",
            "'LL",
            "don't",
            "WE'VE",
            "123",
            "4567890",
            "3.14",
            "-",
            "--",
            "...",
            "!?",
            "/",
            "//",
            "{",
            "}",
            "\"key\":",
            "<|endoftext|>",
            "<|fim_prefix|>",
            "QUJDREVGR0g=",
            "x",
            "ß",
            "Ωμέγα",
            "привет",
            "مرحبا",
            "שלום",
            "नमस्ते",
            "\u{a0}",
            "\u{2003}",
            "\u{200b}",
            "a\u{301}",
            "ﬁ",
        ];
        let mut rng = StdRng::seed_from_u64(11);
        for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
            let v = crate::count::vocab(encoding);
            let core = match encoding {
                Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
                Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            };
            for _ in 0..3000 {
                let n = rng.random_range(1..40);
                let text: String = (0..n).map(|_| *pieces.choose(&mut rng).unwrap()).collect();
                assert_eq!(
                    v.count(&text),
                    core.encode_ordinary(&text).len() as u64,
                    "{encoding:?}: {text:?}"
                );
            }
        }
    }

    /// The whitespace runs tiktoken's look-ahead decides, one by one.
    #[test]
    fn whitespace_runs_split_as_tiktoken_does() {
        let cases = [
            "a  b",
            "a   b",
            "a \t b",
            "  ",
            "a  ",
            "a \n b",
            "a  \n  b",
            " \u{a0} x",
            "x\u{3000}\u{3000}y",
            "\t\tx",
            "x \r\n\r\n y",
            "x\r \r y",
            "  1  2  ",
            "a \u{2003}",
            "!  ?",
            "'s  'T",
            "a\n",
            "a \n",
            " ",
            "\n",
            "x  \u{85}y",
            "😀  😀",
        ];
        for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
            let v = crate::count::vocab(encoding);
            let core = match encoding {
                Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
                Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            };
            for text in cases {
                assert_eq!(
                    v.count(text),
                    core.encode_ordinary(text).len() as u64,
                    "{encoding:?}: {text:?}"
                );
            }
        }
        assert_eq!(shorten_space_run("a  b", 1, 3), 2);
        assert_eq!(shorten_space_run("a  ", 1, 3), 3);
        assert_eq!(shorten_space_run("a \nb", 1, 3), 3);
        assert_eq!(shorten_space_run("a b", 1, 2), 2);
        assert_eq!(shorten_space_run("ab c", 0, 2), 2);
    }

    /// The stack merge and the heap merge agree, piece by piece.
    #[test]
    fn small_and_large_merges_agree() {
        use rand::prelude::*;
        let v = crate::count::vocab(Encoding::O200kBase);
        let alphabet: Vec<char> = "abcdeéxyz THE_qu0123'!\n\t東京😀".chars().collect();
        let mut rng = StdRng::seed_from_u64(7);
        let mut compared = 0;
        while compared < 3000 {
            let n = rng.random_range(2..12);
            let piece: String = (0..n)
                .map(|_| *alphabet.choose(&mut rng).unwrap())
                .collect();
            let bytes = piece.as_bytes();
            if bytes.len() > SMALL_PIECE || v.rank(bytes).is_some() {
                continue;
            }
            assert_eq!(
                v.small_piece_tokens(bytes),
                v.large_piece_tokens(bytes),
                "{piece:?}"
            );
            compared += 1;
        }
    }
}
