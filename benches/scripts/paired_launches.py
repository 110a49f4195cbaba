#!/usr/bin/env python3
"""Run a paired sluice-load comparison several times, every process started
afresh each time, and summarise the per-run medians.

Usage: paired_launches.py RUNS SLUICE_LOAD [sluice-load options...]

One run of `sluice-load --paired` starts each target once. On a shared
2-core machine one process can run a few per cent faster or slower than
another launch of the same binary for its whole life, and paired rounds
cannot see that: the rounds of one run share the launch. Several runs spread
it out. Prints each run's median ratios per scenario (sluice/pingora,
baseline/pingora, sluice/baseline, whichever the run reports), then the
median and range of each over the runs. `--paired` and `--markdown` are added when missing.
"""

import re
import statistics
import subprocess
import sys

RATIO = re.compile(r"^\s*(\S+/\S+) by round: .*; median ([0-9.]+)x\s*$")
SCENARIO = re.compile(r"^CPU s / 1k req by round \((\S+)\):")


def main() -> int:
    if len(sys.argv) < 3 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    runs, cmd = int(sys.argv[1]), sys.argv[2:]
    for flag in ("--paired", "--markdown"):
        if flag not in cmd:
            cmd.append(flag)
    medians: dict[str, list[float]] = {}
    for run in range(1, runs + 1):
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            print(f"run {run}: sluice-load failed ({out.returncode})", file=sys.stderr)
            return 1
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
        print(f"run {run}: " + ", ".join(seen), flush=True)
    print(f"over {runs} runs (each a fresh launch of every target):")
    for name, values in medians.items():
        print(
            f"  {name}: median {statistics.median(values):.3f}x, "
            f"range {min(values):.3f}-{max(values):.3f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
