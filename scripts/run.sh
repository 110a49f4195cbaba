#!/usr/bin/env bash
# Build Sluice and run it on the embedded default (gateway.yaml: three simulated
# Azure OpenAI regions in-process). Extra arguments go to `sluice run`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release -p sluice --bin sluice -- run -c gateway.yaml "$@"
