#!/usr/bin/env python3
"""Run a paired sluice-load comparison several times, every process started
afresh each time, and summarise the per-run medians.

Usage: paired_launches.py RUNS SLUICE_LOAD [--both-roles] [sluice-load options...]

One run of `sluice-load --paired` starts each target once. On a shared
2-core machine one process can run a few per cent faster or slower than
another launch of the same binary for its whole life, and paired rounds
cannot see that: the rounds of one run share the launch. Several runs spread
it out. Prints each run's median ratios per scenario (sluice/pingora,
baseline/pingora, sluice/baseline, whichever the run reports), then the
median and range of each over the runs. `--paired` and `--markdown` are added when missing.

`--both-roles` (with `--sluice A --baseline B`): the RUNS are made again
with the two builds' roles swapped, because the `--sluice` role itself can
read a little cheaper than the `--baseline` one (0.85 % in one pair of sets
on the 2-core machine, none in another: docs/benchmarks.md, twelfth pass).
From the two sets' medians it
prints what the build does with the role taken out, the geometric mean of
the two directions (A/B = sqrt(r1 / r2), where r1 is sluice/baseline with A
as `--sluice` and r2 the same with B there), what the role does
(sqrt(r1 * r2)), and each build over bare pingora, likewise from its two
roles. Bare pingora runs from the `--sluice` file, so it changes with the
roles too.
"""

import math
import re
import statistics
import subprocess
import sys

RATIO = re.compile(r"^\s*(\S+/\S+) by round: .*; median ([0-9.]+)x\s*$")
SCENARIO = re.compile(r"^CPU s / 1k req by round \((\S+)\):")


def run_set(runs: int, cmd: list[str], title: str) -> dict[str, list[float]] | None:
    """RUNS launches of `cmd`; each ratio's per-run medians, by scenario and name."""
    medians: dict[str, list[float]] = {}
    for run in range(1, runs + 1):
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            print(f"run {run}: sluice-load failed ({out.returncode})", file=sys.stderr)
            return None
        seen = []
        scenario = "?"
        for line in out.stdout.splitlines():
            s = SCENARIO.match(line)
            if s:
                scenario = s.group(1)
            m = RATIO.match(line)
            if m:
                name = f"{scenario} {m.group(1)}"
                medians.setdefault(name, []).append(float(m.group(2)))
                seen.append(f"{name} {m.group(2)}x")
        print(f"{title}run {run}: " + ", ".join(seen), flush=True)
    print(f"{title}over {runs} runs (each a fresh launch of every target):")
    for name, values in medians.items():
        print(
            f"  {name}: median {statistics.median(values):.3f}x, "
            f"range {min(values):.3f}-{max(values):.3f}x"
        )
    return medians


def swapped_roles(cmd: list[str]) -> list[str] | None:
    """`cmd` with the values of `--sluice` and `--baseline` exchanged."""
    try:
        i, j = cmd.index("--sluice") + 1, cmd.index("--baseline") + 1
    except ValueError:
        return None
    if max(i, j) >= len(cmd):
        return None
    out = list(cmd)
    out[i], out[j] = cmd[j], cmd[i]
    return out


def without_roles(
    a: str, b: str, first: dict[str, list[float]], second: dict[str, list[float]]
) -> list[str]:
    """The role-free estimates from the two sets' medians (A as `--sluice` in
    `first`, B there in `second`), a line each."""
    lines = []
    scenarios = sorted({name.split(" ", 1)[0] for name in first})
    for scenario in scenarios:

        def med(d: dict[str, list[float]], ratio: str) -> float | None:
            values = d.get(f"{scenario} {ratio}")
            return statistics.median(values) if values else None

        r1, r2 = med(first, "sluice/baseline"), med(second, "sluice/baseline")
        if r1 is not None and r2 is not None:
            lines.append(
                f"  {scenario} {a}/{b}: {math.sqrt(r1 / r2):.3f}x with the role taken out "
                f"(the --sluice role: {math.sqrt(r1 * r2):.4f}x)"
            )
        for build, as_sluice, as_baseline in (
            (a, med(first, "sluice/pingora"), med(second, "baseline/pingora")),
            (b, med(second, "sluice/pingora"), med(first, "baseline/pingora")),
        ):
            if as_sluice is not None and as_baseline is not None:
                lines.append(
                    f"  {scenario} {build}/pingora: {math.sqrt(as_sluice * as_baseline):.3f}x "
                    f"({as_sluice:.3f}x as --sluice, {as_baseline:.3f}x as --baseline)"
                )
    return lines


def main() -> int:
    if len(sys.argv) < 3 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    runs, cmd = int(sys.argv[1]), sys.argv[2:]
    both = "--both-roles" in cmd
    cmd = [c for c in cmd if c != "--both-roles"]
    for flag in ("--paired", "--markdown"):
        if flag not in cmd:
            cmd.append(flag)
    swapped = swapped_roles(cmd) if both else None
    if both and swapped is None:
        print("--both-roles needs --sluice FILE and --baseline FILE", file=sys.stderr)
        return 2
    first = run_set(runs, cmd, "")
    if first is None:
        return 1
    if swapped is None:
        return 0
    a, b = cmd[cmd.index("--sluice") + 1], cmd[cmd.index("--baseline") + 1]
    second = run_set(runs, swapped, "roles swapped: ")
    if second is None:
        return 1
    print(f"both roles ({a} = A as --sluice first, {b} = B):")
    for line in without_roles("A", "B", first, second):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
