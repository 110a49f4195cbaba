#!/usr/bin/env bash
# Run every check and test Sluice has: formatting, clippy, the Rust unit,
# integration and e2e tests, and the Python e2e suite (the real openai SDK and
# plain HTTP against the gateway binary). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --tests

echo "== cargo fmt" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets -- -D warnings
echo "== rust tests" >&2
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
echo "== python e2e" >&2
# The gateway binary nextest's build already made (an integration test of the
# sluice crate needs it): `cargo test --no-run` resolves the same features, so
# nothing is built twice (`cargo build -p sluice` would resolve fewer features
# and rebuild half the dependency tree beside the first).
cargo test --workspace --no-run
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
# The trace viewer's browser test must run here, not skip.
SLUICE_REQUIRE_BROWSER=1 SLUICE_BIN="$target_dir/debug/sluice" .venv/bin/python -m pytest -q tests/python
echo "== all tests passed" >&2
