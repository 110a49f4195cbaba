#!/usr/bin/env bash
# Installs what building (and, with --tests, testing) Sluice needs on a fresh
# Debian machine that has only Rust: cmake for pingora's zlib-ng build, and for
# the tests a Python venv with the openai SDK, pytest and selenium, and
# Debian's chromium and chromium-driver for the trace viewer's browser test;
# with --tests or --bolt, LLVM BOLT (scripts/bolt-release, and its test).
# Idempotent and quiet when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
want_bolt=0
for arg in "$@"; do
  case "$arg" in
  --tests) want_tests=1 want_bolt=1 ;;
  --bolt) want_bolt=1 ;;
  *) echo "usage: scripts/setup.sh [--tests] [--bolt]" >&2; exit 2 ;;
  esac
done

apt_pkgs=()
command -v cmake >/dev/null 2>&1 || apt_pkgs+=(cmake)
command -v cc >/dev/null 2>&1 || apt_pkgs+=(build-essential)
# `nm`: the release link's hot-function order (scripts/link-hot-first).
command -v nm >/dev/null 2>&1 || apt_pkgs+=(binutils)
[ -e /etc/ssl/certs/ca-certificates.crt ] || apt_pkgs+=(ca-certificates)
if [ "$want_bolt" = 1 ]; then
  has_bolt=0
  for b in llvm-bolt llvm-bolt-21 llvm-bolt-20 llvm-bolt-19 llvm-bolt-18; do
    command -v "$b" >/dev/null 2>&1 && has_bolt=1
  done
  [ "$has_bolt" = 1 ] || apt_pkgs+=(bolt-19)
  command -v readelf >/dev/null 2>&1 || apt_pkgs+=(binutils)
  # sluice-load stops the trained proxies with `kill -TERM`, so that they
  # exit and write their profiles.
  [ -x /bin/kill ] || [ -x /usr/bin/kill ] || apt_pkgs+=(procps)
fi
if [ "$want_tests" = 1 ]; then
  python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || apt_pkgs+=(python3-venv)
  command -v openssl >/dev/null 2>&1 || apt_pkgs+=(openssl)  # the TLS backend test
  [ -x /bin/kill ] || [ -x /usr/bin/kill ] || apt_pkgs+=(procps)  # tests stop children by PID
  # The trace viewer's browser test drives Debian's chromium with selenium.
  command -v chromium >/dev/null 2>&1 || apt_pkgs+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || apt_pkgs+=(chromium-driver)
fi
if [ "${#apt_pkgs[@]}" -gt 0 ]; then
  echo "setup: installing ${apt_pkgs[*]} with apt-get" >&2
  sudo_cmd=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "setup: need root (or sudo) to install: ${apt_pkgs[*]}" >&2
      exit 1
    fi
    sudo_cmd="sudo"
  fi
  $sudo_cmd apt-get update -qq
  $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
fi

if [ "$want_tests" = 1 ]; then
  # Lints need rustfmt and clippy (minimal rustup profiles lack them).
  if command -v rustup >/dev/null 2>&1; then
    { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1 \
      || rustup component add rustfmt clippy >&2
  fi
  venv=.venv
  if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv" >&2
    python3 -m venv "$venv"
  fi
  if ! "$venv/bin/python" -c 'import openai, pytest, jwt, selenium, langchain_openai, websockets' >/dev/null 2>&1; then
    echo "setup: installing tests/python/requirements.txt into $venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt
  fi
fi
