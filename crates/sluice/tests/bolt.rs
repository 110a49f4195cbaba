//! scripts/bolt-optimize, the step of scripts/bolt-release that lays a
//! binary's code out by a training run (LLVM BOLT), on a small C program:
//! the program it writes gives the same answers as the original, was laid
//! out from a profile of the training run, and every wrong use or failed
//! step is refused without leaving an output behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bolt-optimize")
}

/// A program with a hot loop and a branch it never takes in training.
const PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
__attribute__((noinline)) static int rare(int x) {
    fprintf(stderr, "rare %d\n", x);
    return x * 3;
}
__attribute__((noinline)) int work(int n) {
    int s = 0;
    for (int i = 0; i < n; i++) {
        if (i % 1000 == 999 && n % 2 == 1) s += rare(i);
        else s += i & 7;
    }
    return s;
}
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 10;
    printf("%d\n", work(n));
    return 0;
}
"#;

fn compile(dir: &Path, name: &str, relocs: bool) -> PathBuf {
    let src = dir.join("main.c");
    std::fs::write(&src, PROGRAM).unwrap();
    let bin = dir.join(name);
    let mut cc = Command::new("cc");
    cc.args(["-O2", "-o"]).arg(&bin).arg(&src);
    if relocs {
        cc.arg("-Wl,--emit-relocs");
    }
    assert!(cc.status().unwrap().success());
    bin
}

fn optimize(bin: &Path, out: &Path, training: &[&str]) -> Output {
    Command::new(script())
        .arg(bin)
        .arg(out)
        .arg("--")
        .args(training)
        .output()
        .unwrap()
}

fn answer(bin: &Path, n: &str) -> (String, String) {
    let out = Command::new(bin).arg(n).output().unwrap();
    assert!(out.status.success());
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn a_program_is_laid_out_by_its_training_run_and_answers_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(dir.path(), "prog", true);
    // A space in the output's path is kept whole.
    let out = dir.path().join("laid out/prog.bolt");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    // The training runs the instrumented copy twice (two processes, two
    // profiles), on even inputs only: `rare` never runs.
    let run = optimize(
        &bin,
        &out,
        &[
            "sh",
            "-c",
            "\"$BOLT_INSTRUMENTED\" 100000 >/dev/null && \"$BOLT_INSTRUMENTED\" 2000 >/dev/null",
        ],
    );
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{log}");
    assert!(log.contains("2 profiles"), "{log}");
    // BOLT says how many functions the profile covers: at least `main` and
    // `work`.
    let covered: u32 = log
        .lines()
        .find(|l| l.contains("have non-empty execution profile"))
        .and_then(|l| l.split("BOLT-INFO: ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no profile summary in {log}"));
    assert!(covered >= 2, "{log}");
    // A program BOLT rewrote keeps its original code under another name.
    let sections = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(&out)
        .output()
        .unwrap();
    let sections = String::from_utf8(sections.stdout).unwrap();
    assert!(sections.contains(".bolt.org.text"), "{sections}");
    // The same answers, the rare branch included.
    for n in ["0", "7", "2000", "100000", "3001"] {
        assert_eq!(answer(&out, n), answer(&bin, n), "input {n}");
    }
    assert!(answer(&out, "3001").1.contains("rare 999"));
}

#[test]
fn wrong_uses_and_failed_steps_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let with = compile(dir.path(), "with-relocs", true);
    let without = compile(dir.path(), "without-relocs", false);
    let out = dir.path().join("out");
    let runs_it = ["sh", "-c", "\"$BOLT_INSTRUMENTED\" 10 >/dev/null"];

    // No relocations: BOLT could not move functions.
    let r = optimize(&without, &out, &runs_it);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--emit-relocs"));

    // No `--` before the training command, or no command at all.
    let r = Command::new(script())
        .arg(&with)
        .arg(&out)
        .args(["sh", "-c", "true"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    let r = Command::new(script())
        .arg(&with)
        .arg(&out)
        .arg("--")
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));

    // Not a binary.
    let r = optimize(&dir.path().join("missing"), &out, &runs_it);
    assert_eq!(r.status.code(), Some(2));

    // A training run that fails, or that never runs the instrumented copy.
    let r = optimize(&with, &out, &["false"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("training command failed"));
    let r = optimize(&with, &out, &["true"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("wrote no profile"));
    assert!(!out.exists());

    // A BOLT step that fails (a profile BOLT cannot read): an output from
    // before is left as it was.
    std::fs::write(&out, "before").unwrap();
    let r = optimize(
        &with,
        &out,
        &[
            "sh",
            "-c",
            "echo garbage > \"$(dirname \"$BOLT_INSTRUMENTED\")/profile.1.fdata\"",
        ],
    );
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("merge failed"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "before");
}

/// scripts/bolt-release's training step, with stand-ins for sluice-load
/// and the binaries: the proxies run from the instrumented copy, the
/// simulator from the plain binary, and both configurations are trained.
#[test]
fn the_release_training_runs_the_proxies_instrumented_and_the_simulator_plain() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let write = |name: &str, body: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        let mut mode = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut mode, 0o755);
        std::fs::set_permissions(&path, mode).unwrap();
        path
    };
    let l = log.display();
    let plain = write("plain", format!("echo plain \"$@\" >> {l}"));
    let instrumented = write("instrumented", format!("echo instrumented \"$@\" >> {l}"));
    // sluice-load as the training calls it: `--sluice PATH ...`; it starts
    // the simulator and a proxy from PATH.
    let load = write(
        "load",
        format!("echo load \"$@\" >> {l}\n\"$2\" sim --listen x\n\"$2\" run -c y"),
    );
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bolt-release");
    let train = |instrumented: Option<&Path>| {
        let mut cmd = Command::new(&release);
        cmd.arg("--train").arg(&load).arg(&plain);
        match instrumented {
            Some(p) => cmd.env("BOLT_INSTRUMENTED", p),
            None => cmd.env_remove("BOLT_INSTRUMENTED"),
        };
        cmd.output().unwrap()
    };
    let out = train(Some(&instrumented));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    let loads: Vec<&&str> = lines.iter().filter(|l| l.starts_with("load ")).collect();
    assert_eq!(loads.len(), 2, "{text}");
    assert!(loads[0].contains("--scenarios chat,stream"), "{text}");
    assert!(loads[0].ends_with("--targets pingora,sluice"), "{text}");
    assert!(loads[1].contains("--policies --targets sluice"), "{text}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| **l == "plain sim --listen x")
            .count(),
        2,
        "{text}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| **l == "instrumented run -c y")
            .count(),
        2,
        "{text}"
    );

    // Only bolt-optimize sets the instrumented binary.
    assert!(!train(None).status.success());
}
