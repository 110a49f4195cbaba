//! Deterministic synthesis: token estimates, generated words, embedding vectors, ids.

use base64::Engine as _;
use rand::Rng as _;
use rand::distr::Alphanumeric;
use serde_json::Value;

/// The hard cap on generated completion tokens.
pub const MAX_COMPLETION_TOKENS: u64 = 4096;

const WORDS: &[&str] = &[
    "the", "lock", "gate", "opens", "and", "water", "flows", "through", "a", "quiet", "canal",
    "past", "old", "mills", "where", "light", "falls", "on", "stone", "bridges", "while", "boats",
    "drift", "slowly", "toward", "harbour", "under", "grey", "clouds", "that", "carry", "rain",
    "from", "distant", "hills", "into", "green", "valleys", "full", "of", "birds", "singing",
    "morning", "songs", "about", "rivers", "waves", "wind",
];

/// The embeddings `input` split into items, each with the seed of its vector
/// (usage is counted separately, with the real tokenizer). Returns `None` when
/// the shape is not an accepted input.
pub fn embedding_inputs(input: &Value) -> Option<Vec<u64>> {
    fn one(v: &Value) -> Option<u64> {
        match v {
            Value::String(s) => Some(fnv1a(s.as_bytes())),
            Value::Array(toks) if toks.iter().all(Value::is_number) => {
                let text = Value::Array(toks.clone()).to_string();
                Some(fnv1a(text.as_bytes()))
            }
            _ => None,
        }
    }
    match input {
        Value::String(_) => one(input).map(|x| vec![x]),
        Value::Array(items) if items.is_empty() => None,
        Value::Array(items) if items.iter().all(Value::is_number) => one(input).map(|x| vec![x]),
        Value::Array(items) => items.iter().map(one).collect(),
        _ => None,
    }
}

/// The `i`-th generated word (one word = one completion token).
pub fn word(i: u64) -> &'static str {
    WORDS[(i % WORDS.len() as u64) as usize]
}

/// `n` generated words joined by spaces.
pub fn completion_text(n: u64) -> String {
    let mut out = String::new();
    for i in 0..n {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word(i));
    }
    out
}

/// `n` (at least one) generated words starting at a word picked by `seed`, the first letter
/// capitalised and a full stop at the end: a deterministic stand-in for recognised speech.
pub fn sentence(seed: u64, n: u64) -> String {
    let start = seed % WORDS.len() as u64;
    let mut out = String::new();
    for i in 0..n.max(1) {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(word(start + i));
    }
    if let Some(first) = out.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    out.push('.');
    out
}

/// 64-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A deterministic unit-length vector of `dims` floats for `seed`.
pub fn embedding_vector(seed: u64, dims: usize) -> Vec<f32> {
    let mut state = seed;
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            // 24 random bits → [-1, 1).
            let bits = (splitmix64(&mut state) >> 40) as f32;
            bits / (1u32 << 23) as f32 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    }
    v
}

/// Base64 of the little-endian f32 bytes, as Azure sends for `encoding_format: "base64"`.
pub fn embedding_base64(v: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A random alphanumeric string.
pub fn random_alnum(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn embedding_input_shapes() {
        assert_eq!(embedding_inputs(&json!("")).unwrap().len(), 1);
        assert_eq!(
            embedding_inputs(&json!(["a", "abcdefgh"])).unwrap().len(),
            2
        );
        let toks = embedding_inputs(&json!([1, 2, 3])).unwrap();
        assert_eq!(toks.len(), 1);
        assert_eq!(toks[0], fnv1a(b"[1,2,3]"));
        assert_eq!(embedding_inputs(&json!([[1, 2], [3]])).unwrap().len(), 2);
        assert!(embedding_inputs(&json!([])).is_none());
        assert!(embedding_inputs(&json!(42)).is_none());
        assert!(embedding_inputs(&json!([{"x": 1}])).is_none());
    }

    #[test]
    fn vectors_are_deterministic_unit_vectors() {
        let a = embedding_vector(7, 64);
        assert_eq!(a, embedding_vector(7, 64));
        assert_ne!(a, embedding_vector(8, 64));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
        assert!(embedding_vector(1, 0).is_empty());
        let b64 = embedding_base64(&a);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(raw.len(), 64 * 4);
        assert_eq!(f32::from_le_bytes(raw[0..4].try_into().unwrap()), a[0]);
    }

    #[test]
    fn every_generated_word_is_one_token_in_both_encodings() {
        // Usage reports one completion token per word; a gateway counting the
        // streamed words with a real tokenizer must get the same number.
        use sluice_tokens::{Encoding, count_text};
        let mut bad = Vec::new();
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            for w in WORDS {
                // Words after the first are streamed with a leading space.
                if count_text(enc, &format!(" {w}")) != 1 {
                    bad.push(format!("{w} ({enc:?})"));
                }
            }
        }
        assert!(bad.is_empty(), "not one token: {bad:?}");
        // The first word of every completion is streamed without a space.
        for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
            assert_eq!(count_text(enc, WORDS[0]), 1);
        }
    }

    #[test]
    fn words_and_ids() {
        assert_eq!(completion_text(0), "");
        assert_eq!(completion_text(3), "the lock gate");
        assert_eq!(completion_text(100).split(' ').count(), 100);
        assert_eq!(random_alnum(29).len(), 29);
        assert_eq!(sentence(0, 3), "The lock gate.");
        assert_eq!(sentence(1, 0), "Lock.");
        assert_eq!(sentence(WORDS.len() as u64 + 2, 2), "Gate opens.");
    }
}
