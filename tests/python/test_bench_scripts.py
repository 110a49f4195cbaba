"""benches/scripts/paired_launches.py: the role-free estimates of
`--both-roles`, driven by a stand-in for sluice-load whose figures are known.

The stand-in reports, for a build X in the `--sluice` role and Y as
`--baseline`: sluice/pingora = cost(X) * ROLE, baseline/pingora = cost(Y),
sluice/baseline = cost(X) * ROLE / cost(Y). The script must recover cost(A),
cost(B), A/B and ROLE from the two directions."""

import math
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benches" / "scripts" / "paired_launches.py"

COSTS = {"build-a": 1.100, "build-b": 1.130}
ROLE = 0.99

FAKE = f"""
import sys
args = sys.argv[1:]
costs = {COSTS!r}
role = {ROLE!r}
s = costs[args[args.index("--sluice") + 1]]
b = costs[args[args.index("--baseline") + 1]]
assert "--paired" in args and "--markdown" in args, args
print("| a table |")
print("CPU s / 1k req by round (chat):")
print("  pingora  0.100  0.100")
print(f"  baseline/pingora by round: 1 1; median {{b:.4f}}x")
print(f"  sluice/pingora by round: 1 1; median {{s * role:.4f}}x")
print(f"  sluice/baseline by round: 1 1; median {{s * role / b:.4f}}x")
"""


def run(tmp_path, *extra):
    fake = tmp_path / "fake_load.py"
    fake.write_text(FAKE)
    return subprocess.run(
        [sys.executable, str(SCRIPT), "2", sys.executable, str(fake), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def figure(out: str, label: str) -> float:
    m = re.search(re.escape(label) + r": (?:median )?([0-9.]+)x", out)
    assert m, f"{label!r} not in:\n{out}"
    return float(m.group(1))


def test_both_roles_separate_the_build_from_the_role(tmp_path):
    out = run(tmp_path, "--both-roles", "--sluice", "build-a", "--baseline", "build-b")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    # Each direction on its own carries the role.
    assert "roles swapped: over 2 runs" in text
    assert math.isclose(figure(text, "chat A/B"), COSTS["build-a"] / COSTS["build-b"], abs_tol=1e-3)
    assert math.isclose(figure(text, "the --sluice role"), ROLE, abs_tol=1e-4)
    assert math.isclose(figure(text, "chat A/pingora"), COSTS["build-a"] * math.sqrt(ROLE), abs_tol=1e-3)
    assert math.isclose(figure(text, "chat B/pingora"), COSTS["build-b"] * math.sqrt(ROLE), abs_tol=1e-3)
    # The first set's own medians are printed as before.
    assert math.isclose(
        figure(text, "chat sluice/baseline"), COSTS["build-a"] * ROLE / COSTS["build-b"], abs_tol=1e-3
    )


def test_one_direction_by_default_and_a_clear_refusal_without_both_builds(tmp_path):
    out = run(tmp_path, "--sluice", "build-a", "--baseline", "build-b")
    assert out.returncode == 0, out.stderr
    assert "roles swapped" not in out.stdout and "both roles" not in out.stdout
    refused = run(tmp_path, "--both-roles", "--sluice", "build-a")
    assert refused.returncode == 2
    assert "--both-roles needs --sluice FILE and --baseline FILE" in refused.stderr
