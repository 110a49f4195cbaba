//! Counter keys for values that come from clients.

use sha2::{Digest, Sha256};

/// The counter key for a value that comes from the client: `"{kind}|{dimension}:{hash}"`, where `hash` is 32 lowercase
/// hex digits, the first 128 bits of the SHA-256 of `value`.
///
/// `kind` says what is counted (`"calls"`, `"tokens"`, ...) and `dimension` what the value is (`"ip"`,
/// `"hdr:x-user"`, `"claim:sub"`, ...); both come from the configuration and stay readable. The value (a header, a
/// claim, the client address, an identity) is hashed, so that:
///
/// - every key has a bounded size however long the value is (a counter costs the same memory for any client input);
/// - the value cannot be confused with the kind or the dimension: whatever bytes it holds (`|`, `:`, newlines, invalid
///   UTF-8), it only ever shows as 32 hex digits. The key reads unambiguously from the right (the last 33 characters
///   are `:` and the hash) and from the left (the kind ends at the first `|`: a `|` or `%` in `kind` is written `%7C`
///   or `%25`), so different (kind, dimension, value) triples give different keys, up to a 128-bit hash collision;
/// - the key is the same in every process, on every machine and in every language, so replicas sharing counters (in
///   Redis) agree on it, and an operator can compute it (`printf %s "$value" | sha256sum | cut -c1-32`).
///
/// SHA-256 was chosen over a fast non-cryptographic hash (such as xxh3-128): the values are chosen by clients, and
/// SHA-256 stays collision-resistant against deliberately crafted inputs, where xxh3 makes no such promise (a client
/// who could craft a value colliding with another caller's would spend that caller's limit). It is also a standard
/// that every platform implements identically, and the crate already depends on it. It costs a single compression
/// for values under 56 bytes (well under a microsecond; `sha2` uses the CPU's SHA instructions where present), and
/// 128 bits keep accidental collisions out of reach (about 2^64 distinct values before one is likely).
///
/// The hash makes keys compact, not anonymous: a key derived from an IPv4 address, for instance, can be reversed by
/// hashing all 2^32 addresses.
pub fn client_key(kind: &str, dimension: &str, value: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(value);
    let mut key = String::with_capacity(kind.len() + dimension.len() + 34);
    for c in kind.chars() {
        match c {
            '|' => key.push_str("%7C"),
            '%' => key.push_str("%25"),
            c => key.push(c),
        }
    }
    key.push('|');
    key.push_str(dimension);
    key.push(':');
    for byte in &digest[..16] {
        key.push(char::from(HEX[usize::from(byte >> 4)]));
        key.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_pinned_to_truncated_sha256() {
        // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223 b00361a396177a9cb410ff61f20015ad (FIPS 180-2).
        assert_eq!(
            client_key("calls", "hdr:x-user", b"abc"),
            "calls|hdr:x-user:ba7816bf8f01cfea414140de5dae2223"
        );
        assert_eq!(
            client_key("tokens", "ip", b"203.0.113.7"),
            "tokens|ip:fec52565aa0cf18f57d7cf5b3ac72850"
        );
        // An absent value hashes like an empty one.
        assert_eq!(
            client_key("quota", "claim:sub", b""),
            "quota|claim:sub:e3b0c44298fc1c149afbf4c8996fb924"
        );
    }

    #[test]
    fn different_kinds_dimensions_or_values_give_different_keys() {
        let keys = [
            client_key("calls", "ip", b"10.0.0.1"),
            client_key("calls", "ip", b"10.0.0.2"),
            client_key("tokens", "ip", b"10.0.0.1"),
            client_key("calls", "id", b"10.0.0.1"),
            client_key("calls", "hdr:x-a", b"10.0.0.1"),
            // Separators in the value cannot reach into the dimension ...
            client_key("calls", "hdr:x", b"a:b"),
            client_key("calls", "hdr:x:a", b"b"),
            client_key("calls", "hdr", b"x:a:b"),
            client_key("calls", "hdr:x", b"a|b"),
            // ... nor separators in the kind or the dimension into each other.
            client_key("a|b", "c", b"v"),
            client_key("a", "b|c", b"v"),
            client_key("a%7Cb", "c", b"v"),
            client_key("a%b", "c", b"v"),
            client_key("a%25b", "c", b"v"),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert!(keys[9].starts_with("a%7Cb|c:"), "{}", keys[9]);
        assert!(keys[12].starts_with("a%25b|c:"), "{}", keys[12]);
    }

    #[test]
    fn keys_have_a_fixed_size_whatever_the_value() {
        let long = vec![0xffu8; 100_000];
        for value in [&b""[..], b"x", &long, b"\n|:\xc3\x28"] {
            let key = client_key("calls", "hdr:x-user", value);
            assert_eq!(key.len(), "calls|hdr:x-user:".len() + 32, "{key}");
            let hash = &key["calls|hdr:x-user:".len()..];
            assert!(
                hash.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{key}"
            );
        }
    }
}
