"""Usage: python3 failover_latency.py SLUICE_BINARY [N]   (needs httpx)

Latency of one failover: the same call through the gateway with no fault,
and with the first-priority region answering 429 (one failover), small and
1 MiB bodies. Sequential requests on one keep-alive connection."""
import json, statistics, subprocess, sys, time, os, signal, pathlib
import httpx

BIN = os.path.abspath(sys.argv[1])
N = int(sys.argv[2]) if len(sys.argv) > 2 else 300
import tempfile
d = pathlib.Path(tempfile.mkdtemp(prefix="sluice-failover-"))
(d / "key").write_text("fo-key-123456")
(d / "gateway.yaml").write_text("""
server: {listen: 127.0.0.1:0, threads: 2}
simulators:
  - {name: a, region: A, time_to_first_token_ms: 0, per_token_ms: 0, completion_tokens: 4, tokens_per_minute: 1000000000}
  - {name: b, region: B, time_to_first_token_ms: 0, per_token_ms: 0, completion_tokens: 4, tokens_per_minute: 1000000000}
backends:
  - {name: a, simulator: a, circuit_breaker: {rules: []}}
  - {name: b, simulator: b}
subscriptions: [{name: t, primary_key: {file: key}}]
pools:
  - name: p
    backends: [{backend: a, priority: 1}, {backend: b, priority: 2}]
apis: [{name: x, path: /openai, pool: p}]
""")
proc = subprocess.Popen([BIN, "run", "-c", "gateway.yaml"], cwd=d, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
url = None
for line in proc.stdout:
    if line.startswith("sluice: listening on "):
        url = line.split("on ", 1)[1].strip(); break
CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
small = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
big = json.dumps({"messages": [{"role": "user", "content": "x" * (1024 * 1024)}], "max_tokens": 4}).encode()
try:
    res = {}
    with httpx.Client(base_url=url, headers={"api-key": "fo-key-123456", "content-type": "application/json"}, timeout=30) as c:
        for _ in range(50):
            c.post(CHAT, content=small)
        for label, body, n in [("small", small, N), ("1 MiB", big, max(30, N // 10))]:
            time.sleep(1.5)  # a's headroom, exhausted by the 429s before, expires
            for fault in [False, True]:
                h = {"x-sim-fault": "status=429", "x-sim-fault-region": "a"} if fault else {}
                t = []
                for _ in range(n):
                    s = time.perf_counter()
                    r = c.post(CHAT, content=body, headers=h)
                    t.append((time.perf_counter() - s) * 1000)
                    assert r.status_code == 200 and r.headers["x-ms-region"] == ("B" if fault else "A"), (label, fault, r.status_code, r.headers.get("x-ms-region"))
                t.sort()
                res[(label, fault)] = (statistics.median(t), t[int(len(t) * 0.9)])
finally:
    # Stopped by its PID, whatever happened above.
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
print("| Body | No fault p50 / p90 ms | One failover (429 from A, then B) p50 / p90 ms | Added p50 ms |")
print("|---|---:|---:|---:|")
for label in ["small", "1 MiB"]:
    a, b = res[(label, False)], res[(label, True)]
    print(f"| {label} | {a[0]:.3f} / {a[1]:.3f} | {b[0]:.3f} / {b[1]:.3f} | +{b[0]-a[0]:.3f} |")
