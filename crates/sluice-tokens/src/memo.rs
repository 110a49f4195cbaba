//! Counts of prompt texts seen before.
//!
//! A chat client sends the whole conversation again with every turn, and
//! most applications send the same system prompt with every call: the
//! prompt estimate would count the same texts over and over. [`count`]
//! remembers the count of each text it has seen in a fixed table of
//! [`SLOTS`] entries (128 KiB, made on first use), so that a text seen before
//! costs one hash of its bytes instead of a tokenization, and a text not seen
//! before costs that hash more than it did.
//!
//! Each slot is one `AtomicU64`: 40 bits of the text's hash (the tag) and its
//! count in the low [`COUNT_BITS`] bits. The slot is chosen by other bits of
//! the same hash; a text whose slot holds another tag is counted and takes
//! the slot over. Reading and writing a slot is one atomic operation, so
//! threads never see half an entry. The hash is keyed at random per process
//! (std's `RandomState`, SipHash): nobody can choose texts that collide, and
//! a false hit (the tag and slot of two texts agreeing by chance, about one
//! in 2^40 lookups of unseen texts) would only misjudge one estimate, which
//! the backend's reported usage settles afterwards.

use std::hash::BuildHasher;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Encoding;
use crate::count;

/// Entries in the table (a power of two).
const SLOTS: usize = 1 << 14;
/// Bits of a slot holding the count; a text of more tokens is never remembered.
const COUNT_BITS: u32 = 24;
/// Bits of a slot holding the hash's tag.
const TAG_BITS: u32 = 64 - COUNT_BITS;

/// Remembered token counts, shared by every thread.
#[derive(Debug)]
pub(crate) struct CountMemo {
    slots: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
}

impl CountMemo {
    /// A table of `slots` entries (a power of two).
    fn with_slots(slots: usize) -> Self {
        debug_assert!(slots.is_power_of_two());
        CountMemo {
            slots: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// The slot and tag of `text` in `encoding`. The tag is never 0 (an
    /// empty slot).
    fn place(&self, encoding: Encoding, text: &str) -> (usize, u64) {
        let h = self.hasher.hash_one((encoding, text));
        let index = (h as usize) & (self.slots.len() - 1);
        let tag = (h >> COUNT_BITS) | 1;
        (index, tag)
    }

    /// The remembered count of `text`, if it is in the table.
    #[cfg(test)]
    fn lookup(&self, encoding: Encoding, text: &str) -> Option<u64> {
        let (index, tag) = self.place(encoding, text);
        let entry = self.slots[index].load(Ordering::Relaxed);
        (entry >> COUNT_BITS == tag).then_some(entry & count_mask())
    }

    /// `text`'s token count: remembered, or counted and then remembered.
    pub(crate) fn count(&self, encoding: Encoding, text: &str) -> u64 {
        let (index, tag) = self.place(encoding, text);
        let slot = &self.slots[index];
        let entry = slot.load(Ordering::Relaxed);
        if entry >> COUNT_BITS == tag {
            return entry & count_mask();
        }
        let n = count::count(encoding, text);
        if let Some(entry) = pack(tag, n) {
            slot.store(entry, Ordering::Relaxed);
        }
        n
    }
}

/// The low [`COUNT_BITS`] bits.
const fn count_mask() -> u64 {
    (1 << COUNT_BITS) - 1
}

/// A slot holding `tag` (at most [`TAG_BITS`] bits) and the count `n`;
/// `None` when `n` does not fit.
fn pack(tag: u64, n: u64) -> Option<u64> {
    (n <= count_mask() && tag >> TAG_BITS == 0).then_some((tag << COUNT_BITS) | n)
}

/// Counts `text`'s tokens in `encoding`, remembering the counts of texts
/// seen before (see the module's documentation). The same answer as
/// [`count::count`]; for prompt texts, which repeat.
pub(crate) fn count(encoding: Encoding, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    if let Some(n) = role_count(encoding, text) {
        return n;
    }
    static MEMO: OnceLock<CountMemo> = OnceLock::new();
    MEMO.get_or_init(|| CountMemo::with_slots(SLOTS))
        .count(encoding, text)
}

/// The role names nearly every message carries, the commonest texts of all.
const ROLES: [&str; 6] = [
    "user",
    "system",
    "assistant",
    "developer",
    "tool",
    "function",
];

/// The count of a role name, counted once per encoding and then found by a
/// comparison instead of the table's hash.
fn role_count(encoding: Encoding, text: &str) -> Option<u64> {
    // Every role name is 4 to 9 bytes long: others skip the comparisons.
    if !(4..=9).contains(&text.len()) {
        return None;
    }
    let i = ROLES.iter().position(|r| *r == text)?;
    static COUNTS: [OnceLock<[u64; ROLES.len()]>; 2] = [OnceLock::new(), OnceLock::new()];
    let counts = COUNTS[match encoding {
        Encoding::O200kBase => 0,
        Encoding::Cl100kBase => 1,
    }]
    .get_or_init(|| ROLES.map(|r| count::count(encoding, r)));
    Some(counts[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_counted_as_any_text() {
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            for role in ROLES {
                assert_eq!(role_count(enc, role), Some(count::count(enc, role)));
                assert_eq!(super::count(enc, role), count::count(enc, role));
            }
            for other in ["User", "users", "use", "assistants", "toolbox", "sys"] {
                assert_eq!(role_count(enc, other), None, "{other}");
                assert_eq!(super::count(enc, other), count::count(enc, other));
            }
        }
    }

    #[test]
    fn remembered_counts_are_the_counts() {
        let texts = [
            "You are a terse assistant. Answer in one short sentence.",
            "user",
            "héllo wörld, 你好, 👋🏽 \t\n  spaces",
            "a",
        ];
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            for t in texts {
                let exact = count::count(enc, t);
                assert_eq!(count(enc, t), exact, "{t:?}");
                assert_eq!(count(enc, t), exact, "{t:?} (remembered)");
            }
        }
        assert_eq!(count(Encoding::O200kBase, ""), 0);
    }

    #[test]
    fn a_counted_text_is_found_again_and_another_is_not() {
        let memo = CountMemo::with_slots(SLOTS);
        let t = "Why would a team put an API gateway in front of Azure OpenAI?";
        assert_eq!(memo.lookup(Encoding::O200kBase, t), None);
        let n = memo.count(Encoding::O200kBase, t);
        assert_eq!(n, count::count(Encoding::O200kBase, t));
        assert_eq!(memo.lookup(Encoding::O200kBase, t), Some(n));
        // The encoding is part of the key.
        assert_eq!(memo.lookup(Encoding::Cl100kBase, t), None);
        assert_eq!(memo.lookup(Encoding::O200kBase, "another text"), None);
    }

    #[test]
    fn a_text_taking_a_slot_over_leaves_the_other_counted_again() {
        // One slot: every text lands in it.
        let memo = CountMemo::with_slots(1);
        let (a, b) = (
            "first text of several tokens",
            "second, longer text of more tokens",
        );
        let (na, nb) = (
            count::count(Encoding::O200kBase, a),
            count::count(Encoding::O200kBase, b),
        );
        assert_ne!(na, nb);
        assert_eq!(memo.count(Encoding::O200kBase, a), na);
        assert_eq!(memo.count(Encoding::O200kBase, b), nb);
        assert_eq!(memo.lookup(Encoding::O200kBase, a), None);
        assert_eq!(memo.lookup(Encoding::O200kBase, b), Some(nb));
        assert_eq!(memo.count(Encoding::O200kBase, a), na);
        assert_eq!(memo.lookup(Encoding::O200kBase, a), Some(na));
    }

    #[test]
    fn a_remembered_count_is_answered_without_counting() {
        // A planted entry (a count no tokenizer would give) is what comes
        // back: the table is read before anything is counted.
        let memo = CountMemo::with_slots(4);
        let t = "a text whose entry is planted";
        let (index, tag) = memo.place(Encoding::O200kBase, t);
        memo.slots[index].store(pack(tag, 999).unwrap(), Ordering::Relaxed);
        assert_eq!(memo.count(Encoding::O200kBase, t), 999);
        // Another tag in the slot is not this text's: it is counted.
        let other = pack(tag ^ 2, 999).unwrap();
        memo.slots[index].store(other, Ordering::Relaxed);
        assert_eq!(
            memo.count(Encoding::O200kBase, t),
            count::count(Encoding::O200kBase, t)
        );
    }

    #[test]
    fn slots_pack_a_tag_and_a_count_that_fit() {
        assert_eq!(pack(1, 0), Some(1 << COUNT_BITS));
        assert_eq!(pack(5, 7), Some((5 << COUNT_BITS) | 7));
        assert_eq!(
            pack(1, count_mask()),
            Some((1 << COUNT_BITS) | count_mask())
        );
        assert_eq!(pack(1, count_mask() + 1), None);
        let widest = (1u64 << TAG_BITS) - 1;
        assert_eq!(pack(widest, 3), Some((widest << COUNT_BITS) | 3));
        assert_eq!(pack(widest + 1, 3), None);
        // A place's tag always fits and is never an empty slot's.
        let memo = CountMemo::with_slots(8);
        for t in ["x", "y", "zz", "a longer text"] {
            let (index, tag) = memo.place(Encoding::O200kBase, t);
            assert!(index < 8);
            assert!(tag != 0 && tag >> TAG_BITS == 0);
        }
    }
}
