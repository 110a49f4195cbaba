"""Starts the sluice binary (SLUICE_BIN) as a child process on 127.0.0.1 with a
free port and in-process simulated regions, for the whole session."""

import os
import pathlib
import queue
import signal
import socket
import subprocess
import threading
import time

import pytest

KEY = "py-team-a-primary-key"
KEY2 = "py-team-a-secondary-key"
BACKEND_KEY = "py-backend-key"
PER_TOKEN_MS = 40

CONFIG = f"""
server:
  listen: 127.0.0.1:0
  threads: 2
simulators:
  - name: eastus
    region: East US
    api_key: {{file: backend.key}}
    tokens_per_minute: 10000000
  - name: slow
    region: Sweden Central
    api_key: {{file: backend.key}}
    time_to_first_token_ms: 50
    per_token_ms: {PER_TOKEN_MS}
backends:
  - name: eastus
    simulator: eastus
    api_key: {{file: backend.key}}
  - name: slow
    simulator: slow
    api_key: {{file: backend.key}}
subscriptions:
  - name: team-a
    primary_key: {{file: a.key}}
    secondary_key: {{file: a2.key}}
apis:
  - name: azure-openai
    path: /openai
    backends: [eastus]
  - name: slow
    path: /slow/openai
    backends: [slow]
"""


def _binary() -> str:
    b = os.environ.get("SLUICE_BIN")
    if not b:
        root = pathlib.Path(__file__).resolve().parents[2]
        b = str(root / "target" / "debug" / "sluice")
    if not os.path.exists(b):
        pytest.exit(f"sluice binary not found at {b}: build it or set SLUICE_BIN", 2)
    return os.path.abspath(b)


class Gateway:
    """A running `sluice run` child process."""

    def __init__(self, proc, url, management, simulators=None, directory=None):
        self.proc = proc
        # Where it runs: gateway.yaml and its log (sluice.log) are there.
        self.directory = directory
        self.url = url
        self.management = management
        # Simulator name -> its URL (from the banner).
        self.simulators = simulators or {}

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_gateway(directory, config: str, env=None) -> Gateway:
    """Write `config` as gateway.yaml in `directory`, start sluice, and wait
    until its data plane (and management listener, if any) accept connections.
    Its log (stderr) goes to `directory/sluice.log`, at `warn`, or at the
    level in `SLUICE_TEST_LOG` when set (`debug` to see why a test failed)."""
    (directory / "gateway.yaml").write_text(config)
    log = open(directory / "sluice.log", "w")
    proc = subprocess.Popen(
        [_binary(), "run", "-c", "gateway.yaml"],
        cwd=directory,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "RUST_LOG": os.environ.get("SLUICE_TEST_LOG", "warn"), **(env or {})},
    )
    lines: "queue.Queue[str]" = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    url = management = None
    deadline = time.monotonic() + 60
    while url is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            proc.kill()
            pytest.fail("sluice did not print its listening line")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line.startswith("sluice: management on "):
            management = line.split(" on ", 1)[1].split()[0].strip()
        if line.startswith("sluice: listening on "):
            url = line.split("listening on ", 1)[1].strip()
    # The management line follows the listening line in the banner.
    if "management:" in config:
        while management is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                proc.kill()
                pytest.fail("sluice did not print its management line")
            if line.startswith("sluice: management on "):
                management = line.split(" on ", 1)[1].split()[0].strip()
    # The banner then lists the simulators, before its closing hint.
    simulators = {}
    if "simulators:" in config:
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line.startswith("  simulator '"):
                name = line.split("'", 2)[1]
                simulators[name] = line.rsplit(": ", 1)[1].strip()
            elif simulators and not line.startswith("  "):
                break
    for u in [url] + ([management] if management else []):
        host, port = u.removeprefix("http://").rsplit(":", 1)
        while True:  # readiness: the port accepts connections
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail("sluice never accepted connections")
                time.sleep(0.01)
    return Gateway(proc, url, management, simulators, directory)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    d = tmp_path_factory.mktemp("gw")
    (d / "a.key").write_text(KEY)
    (d / "a2.key").write_text(KEY2)
    (d / "backend.key").write_text(BACKEND_KEY)
    gw = start_gateway(d, CONFIG)
    yield gw.url
    gw.stop()
