#!/usr/bin/env python3
"""Write the list of functions every proxied request runs, hottest first,
for scripts/link-hot-first (crates/sluice/hot-functions.txt).

Usage: hot_functions.py SLUICE_LOAD SLUICE_BIN [OUT]

Runs `sluice-load` under callgrind twice per configuration, a short run and
a long one (6 s and 18 s at 40 requests/s): the key check only (bare pingora
and the gateway, chat and streams) and every policy (the gateway, chat and
streams). What a function costs in the long run over the short one is what
the extra requests cost: start-up work (configuration, certificates) cancels
out. Functions of the Sluice binary with at least one instruction per
request are kept, ranked by their instructions (the key-only path's first,
then what only the policies add), each named by its mangled
name without rustc's hash (`17h<hex>E`), which the linker wrapper finds
again in whatever build it links. Needs valgrind.
"""

import os
import re
import subprocess
import sys
import tempfile

# rustc's hash, after LLVM's suffixes (`.llvm.<n>`, `.<n>`) are taken off:
# all three change between builds.
SUFFIX = re.compile(r"(\.llvm)?\.[0-9]+$")
HASH = re.compile(r"17h[0-9a-f]{16}E$")


def without_hash(name: str) -> str:
    """A mangled name as the list keeps it (what scripts/link-hot-first's
    `key` computes from a full name)."""
    return HASH.sub("", SUFFIX.sub("", name))


SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_$.]*$")
LINE = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*?)\s*\[([^\]]*)\]\s*$")
RATE = 40
SHORT, LONG = 6, 18
RUNS = [
    ["--targets", "pingora,sluice"],
    ["--targets", "sluice", "--policies"],
]


def wrapper(tmp: str, binary: str) -> str:
    """A `--sluice` stand-in: the simulator runs as it is, every proxy under
    callgrind, each writing its own profile into `tmp`, named after the copy
    sluice-load runs it from (`bin-pingora`, `bin-sluice`)."""
    path = os.path.join(tmp, "under-callgrind.sh")
    with open(path, "w") as f:
        f.write(
            "#!/bin/sh\n"
            f'if [ "$1" = sim ]; then exec "{binary}" "$@"; fi\n'
            "exec valgrind --tool=callgrind --demangle=no "
            f'--callgrind-out-file="{tmp}/$CG_TAG-${{0##*/}}.out" "{binary}" "$@"\n'
        )
    os.chmod(path, 0o755)
    return path


def self_cost(profile: str) -> dict:
    """Instructions per function of the profiled binary itself (not libc)."""
    out = subprocess.run(
        ["callgrind_annotate", "--auto=no", "--threshold=100", profile],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cost = {}
    for line in out.splitlines():
        m = LINE.match(line)
        if not m or m.group(3).startswith(("/usr/", "/lib")):
            continue
        name = m.group(2).rsplit(":", 1)[-1].split("'")[0]
        if not SYMBOL.match(name):
            continue
        cost[name] = cost.get(name, 0) + int(m.group(1).replace(",", ""))
    return cost


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    load, binary = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    here = os.path.dirname(os.path.abspath(__file__))
    default_out = os.path.join(here, "..", "..", "crates", "sluice", "hot-functions.txt")
    out = sys.argv[3] if len(sys.argv) == 4 else default_out
    # One table per configuration: the key-only path's functions go first,
    # then those only the policies run, so that the lighter path's code
    # stays together.
    per_request = [{} for _ in RUNS]
    with tempfile.TemporaryDirectory() as tmp:
        stand_in = wrapper(tmp, binary)
        for i, extra in enumerate(RUNS):
            profiles = {}
            for secs in (SHORT, LONG):
                tag = f"r{i}-{secs}"
                subprocess.run(
                    [load, "--sluice", stand_in, "--scenarios", "chat,stream",
                     "--rate", str(RATE), "--concurrency", "4",
                     "--duration-secs", str(secs), "--warmup-secs", "0", *extra],
                    env={**os.environ, "CG_TAG": tag},
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                profiles[secs] = {
                    f[len(tag) + 1 :]: os.path.join(tmp, f)
                    for f in os.listdir(tmp)
                    if f.startswith(tag + "-")
                }
            if not profiles[LONG] or profiles[SHORT].keys() != profiles[LONG].keys():
                sys.exit(f"profiles of the two runs differ: {profiles}")
            for proxy, long in profiles[LONG].items():
                before, after = self_cost(profiles[SHORT][proxy]), self_cost(long)
                for name, ir in after.items():
                    extra_ir = ir - before.get(name, 0)
                    if extra_ir > 0:
                        key = without_hash(name)
                        per_request[i][key] = per_request[i].get(key, 0) + extra_ir
    # Requests in the long run over the short one, per target and scenario.
    floor = (LONG - SHORT) * RATE
    names = []
    for table in per_request:
        listed = set(names)
        names += [
            n
            for n, ir in sorted(table.items(), key=lambda kv: -kv[1])
            if ir >= floor and n not in listed
        ]
    with open(out, "w") as f:
        f.write(
            "# Functions every proxied request runs, hottest first, by mangled name\n"
            "# without rustc's hash: scripts/link-hot-first places them side by side.\n"
            "# Written by benches/scripts/hot_functions.py (docs/benchmarks.md).\n"
        )
        f.writelines(n + "\n" for n in names)
    print(f"{len(names)} functions written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
