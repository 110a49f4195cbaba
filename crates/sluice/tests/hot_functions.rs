//! The release link's hot-function list (crates/sluice/hot-functions.txt)
//! and the linker wrapper that uses it (scripts/link-hot-first): the list
//! is well formed, the wrapper finds each listed function's full name in a
//! real binary whatever rustc's hash, in the list's order, and any other
//! link goes through to `cc` unchanged.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn wrapper() -> PathBuf {
    root().join("scripts/link-hot-first")
}

/// A mangled Rust name without rustc's `17h<16 hex>E` hash (the last
/// thing in a name, or before LLVM's numeric suffix, which goes too).
fn without_hash(name: &str) -> &str {
    let base = match name.rsplit_once('.') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            base.strip_suffix(".llvm").unwrap_or(base)
        }
        _ => name,
    };
    match base.len().checked_sub(20) {
        Some(cut)
            if base.ends_with('E')
                && base[cut..].starts_with("17h")
                && base[cut + 3..base.len() - 1]
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit()) =>
        {
            &base[..cut]
        }
        _ => base,
    }
}

/// Whether `name` holds rustc's hash anywhere.
fn has_hash(name: &str) -> bool {
    name.as_bytes().windows(20).any(|w| {
        w.starts_with(b"17h") && w[19] == b'E' && w[3..19].iter().all(u8::is_ascii_hexdigit)
    })
}

#[test]
fn the_list_names_functions_without_their_hash_once_each() {
    let text = std::fs::read_to_string(root().join("crates/sluice/hot-functions.txt")).unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert!(names.len() > 100, "{} names", names.len());
    let mut seen = HashSet::new();
    for name in &names {
        assert!(seen.insert(*name), "{name} listed twice");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_$.".contains(&b)),
            "{name}"
        );
        assert!(!has_hash(name), "{name} keeps its hash");
        assert_eq!(without_hash(name), *name, "{name} keeps a suffix");
    }
    // The gateway's own hooks and pingora's request loop are among them.
    for part in ["sluice_proxy", "pingora_proxy", "pingora_core"] {
        assert!(names.iter().any(|n| n.contains(part)), "nothing of {part}");
    }
}

/// Defined text symbols of `file` (`nm`).
fn text_symbols(file: &str) -> Vec<String> {
    let out = Command::new("nm")
        .args(["--defined-only", file])
        .output()
        .expect("nm runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, kind, name) = (f.next()?, f.next()?, f.next()?);
            matches!(kind, "t" | "T").then(|| name.to_string())
        })
        .collect()
}

#[test]
fn the_wrapper_finds_each_listed_function_in_a_binary_in_list_order() {
    let symbols = text_symbols(BIN);
    // Three of the gateway's own functions, each of one full name.
    let mut count = std::collections::HashMap::new();
    for s in &symbols {
        *count.entry(without_hash(s)).or_insert(0) += 1;
    }
    let picked: Vec<&String> = symbols
        .iter()
        .filter(|s| s.starts_with("_ZN12sluice_proxy") && without_hash(s) != s.as_str())
        .filter(|s| count[without_hash(s)] == 1)
        .take(3)
        .collect();
    assert_eq!(picked.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("hot.txt");
    // Listed in an order of their own, with a C function (no hash, taken
    // as it is) and a name found nowhere (skipped).
    let listed = [
        "# a comment line".to_string(),
        without_hash(picked[2]).to_string(),
        "mi_free".to_string(),
        without_hash(picked[0]).to_string(),
        "_ZN12sluice_proxy14no_such_function".to_string(),
        without_hash(picked[1]).to_string(),
    ];
    std::fs::write(&list, listed.join("\n") + "\n").unwrap();
    let out = Command::new(wrapper())
        .arg("--resolve")
        .arg(&list)
        .arg(BIN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let order: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let want = [
        picked[2].to_string(),
        "mi_free".to_string(),
        picked[0].to_string(),
        picked[1].to_string(),
    ];
    assert_eq!(order, want);
}

/// Links `src` to `dir/out` through the wrapper, runs the program, and
/// tells whether an order file was written beside it.
fn link_and_run(dir: &Path, src: &Path, out: &str) -> bool {
    let bin = dir.join(out);
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    let status = Command::new(wrapper())
        .arg(src)
        .arg("-o")
        .arg(&bin)
        .status()
        .unwrap();
    assert!(status.success(), "linking {out}");
    assert_eq!(Command::new(&bin).status().unwrap().code(), Some(7));
    dir.join(format!("{out}.hot-order")).exists()
}

#[test]
fn any_other_link_goes_through_to_cc_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("main.c");
    std::fs::write(&src, "int main(void) { return 7; }\n").unwrap();
    // Not the release gateway: linked by `cc` as rustc asked, no order file.
    assert!(!link_and_run(dir.path(), &src, "debug/other"));
    // The release gateway's name, but not linked by LLD: no order either.
    assert!(!link_and_run(dir.path(), &src, "release/deps/sluice-0123"));
}

/// rustc's own LLD, as it hands it to `cc` (`-B` the directory holding `ld.lld`).
fn rust_lld_dir() -> PathBuf {
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["--print", "sysroot"])
        .output()
        .unwrap();
    let sysroot = String::from_utf8(out.stdout).unwrap();
    let dir = Path::new(sysroot.trim()).join("lib/rustlib/x86_64-unknown-linux-gnu/bin/gcc-ld");
    assert!(dir.join("ld.lld").exists(), "{}", dir.display());
    dir
}

#[test]
fn the_release_gateway_linked_by_lld_gets_the_listed_order() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("main.c");
    // In source order `hot_a` comes first; the list wants `hot_b` first.
    std::fs::write(
        &src,
        "void hot_a(void) {}\nvoid hot_b(void) {}\n\
         int main(void) { hot_a(); hot_b(); return 7; }\n",
    )
    .unwrap();
    let list = dir.path().join("hot.txt");
    std::fs::write(&list, "# hottest first\nhot_b\nhot_a\n").unwrap();
    let lld = format!("-B{}", rust_lld_dir().display());
    // A comma in the path: the order file still reaches the linker whole.
    let deps = dir.path().join("a,b/release/deps");
    std::fs::create_dir_all(&deps).unwrap();
    let link = |out: &Path, last_linker: &str| {
        let status = Command::new(wrapper())
            .env("SLUICE_HOT_FUNCTIONS", &list)
            .args(["-ffunction-sections", "-fuse-ld=lld", &lld, last_linker])
            .arg(&src)
            .arg("-o")
            .arg(out)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(Command::new(out).status().unwrap().code(), Some(7));
    };
    let address = |bin: &Path, name: &str| {
        let out = Command::new("nm").arg(bin).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let line = text
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("{name} not in {text}"));
        u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap()
    };

    let ordered = deps.join("sluice-0123");
    link(&ordered, "-fuse-ld=lld");
    let order = std::fs::read_to_string(deps.join("sluice-0123.hot-order")).unwrap();
    assert_eq!(order, "hot_b\nhot_a\n");
    assert!(address(&ordered, "hot_b") < address(&ordered, "hot_a"));

    // Another linker named after LLD wins: the link goes through unordered.
    let plain = deps.join("sluice-4567");
    link(&plain, "-fuse-ld=bfd");
    assert!(!deps.join("sluice-4567.hot-order").exists());
    assert!(address(&plain, "hot_a") < address(&plain, "hot_b"));

    // An order file that cannot be written: linked unordered, not failed.
    let blocked = deps.join("sluice-89ab");
    std::fs::create_dir_all(deps.join("sluice-89ab.hot-order")).unwrap();
    link(&blocked, "-fuse-ld=lld");
    assert!(address(&blocked, "hot_a") < address(&blocked, "hot_b"));
}
