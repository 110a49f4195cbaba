"""Issue 7 end to end: region routing. Pools with priorities and weights,
circuit breakers that honour Retry-After, failover the client never sees
(any body up to the limit) and steering before a backend throttles, driven
with the real openai SDK (retries off) and plain HTTP. Faults come from the
simulators: the `x-sim-fault` header (with `x-sim-fault-region` to pick the
regions that fail) or their control endpoint."""

import concurrent.futures
import http.client
import json
import socket
import time
import urllib.parse

import httpx
import pytest
from openai import AzureOpenAI

from conftest import start_gateway

API_VERSION = "2024-10-21"
KEY = "routing-team-key-0123456789"
OPERATOR = "routing-operator-token-0123456789"
BACKEND_KEY = "routing-backend-key-abcdef"
CHAT = f"/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}"


def free_port() -> int:
    """A port nothing listens on (bound, then released): connections to it
    are refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sim(name, region, extra=""):
    return f"""  - name: {name}
    region: {region}
    api_key: {{file: backend.key}}
    time_to_first_token_ms: 5
    per_token_ms: 1
    completion_tokens: 4
{extra}"""


def backend(name, extra=""):
    return f"""  - name: {name}
    simulator: {name}
    api_key: {{file: backend.key}}
{extra}"""


def config(sims, backends, pool, api_extra="", server_extra=""):
    return f"""
server:
  listen: 127.0.0.1:0
  threads: 2
  management:
    listen: 127.0.0.1:0
    operator_tokens: [{{file: operator.token}}]
{server_extra}
simulators:
{sims}
backends:
{backends}
subscriptions:
  - name: team
    primary_key: {{file: key}}
pools:
  - name: main
    backends:
{pool}
apis:
  - name: aoai
    path: /openai
    pool: main
{api_extra}
"""


THREE_SIMS = sim("eastus", "East US") + sim("westus", "West US") + sim("swedencentral", "Sweden Central")
EQUAL_POOL = """      - {backend: eastus}
      - {backend: westus}
      - {backend: swedencentral}
"""


@pytest.fixture
def start(tmp_path):
    """Start a gateway for one test and stop it afterwards."""
    (tmp_path / "key").write_text(KEY)
    (tmp_path / "backend.key").write_text(BACKEND_KEY)
    (tmp_path / "operator.token").write_text(OPERATOR)
    started = []

    def run(cfg):
        gw = start_gateway(tmp_path, cfg)
        started.append(gw)
        return gw

    yield run
    for gw in started:
        gw.stop()


def client(gw, headers=None):
    return AzureOpenAI(
        azure_endpoint=gw.url,
        api_key=KEY,
        api_version=API_VERSION,
        max_retries=0,
        default_headers=headers or {},
    )


def chat(c, stream=False):
    """One chat call through the SDK; returns (text, region)."""
    if stream:
        raw = c.chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=4,
            stream=True,
        )
        region = raw.headers.get("x-ms-region")
        text = "".join(
            (ch.choices[0].delta.content or "") for ch in raw.parse() if ch.choices
        )
        return text, region
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    return raw.parse().choices[0].message.content, raw.headers.get("x-ms-region")


def burst(gw, headers, n=24, workers=8):
    """n SDK calls, half streamed, concurrently; returns the regions that
    answered. Any error fails the test."""
    c = client(gw, headers)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda i: chat(c, stream=i % 2 == 1), range(n)))
    for text, _ in results:
        assert text, "an empty answer"
    return [region for _, region in results]


def backends_view(gw):
    r = httpx.get(f"{gw.management}/backends", headers={"authorization": f"Bearer {OPERATOR}"}, timeout=10)
    assert r.status_code == 200
    return {b["name"]: b for b in r.json()["backends"]}


def metric(gw, name, **labels):
    text = httpx.get(f"{gw.management}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize(
    "fault",
    ["throttle=2000", "status=500", "status=503", "close", "hang", "slow-first-byte=5000"],
)
def test_one_healthy_region_left_means_zero_errors(start, fault):
    # Two regions fail in the same way; the SDK (retries off) never sees it.
    # The failing regions answer slowly-or-never for hang/slow-first-byte:
    # their read timeout is short.
    short = "    timeouts: {read_ms: 500}\n"
    gw = start(
        config(
            THREE_SIMS,
            backend("eastus", short) + backend("westus", short) + backend("swedencentral"),
            EQUAL_POOL,
        )
    )
    headers = {"x-sim-fault": fault, "x-sim-fault-region": "eastus,westus"}
    regions = burst(gw, headers, n=16 if fault in ("hang", "slow-first-byte=5000") else 30)
    assert set(regions) == {"Sweden Central"}, regions
    # The failures were seen: attempts at the failing regions and failovers.
    assert metric(gw, "sluice_failovers_total") >= 1
    assert metric(gw, "sluice_backend_attempts_total", backend="swedencentral", outcome="200") == len(regions)
    # Planned failovers are not warnings: pingora's retry warning stays out
    # of the log (RUST_LOG=warn).
    log = (gw.directory / "sluice.log").read_text()
    assert "Fail to proxy" not in log, log[-2000:]


def test_a_refused_connection_fails_over(start):
    dead = free_port()
    sims = sim("westus", "West US")
    backends = f"""  - name: dead
    url: http://127.0.0.1:{dead}
    api_key: {{file: backend.key}}
""" + backend("westus")
    pool = "      - {backend: dead, priority: 1}\n      - {backend: westus, priority: 2}\n"
    gw = start(config(sims, backends, pool))
    regions = burst(gw, {}, n=12)
    assert set(regions) == {"West US"}
    view = backends_view(gw)
    # Three connection failures within 10 s trip the default breaker.
    assert view["dead"]["state"] == "open", view["dead"]
    assert view["dead"]["open_because"]["outcome"] == "connect_failed"


def _http(gw, method, path, body=None, headers=None, chunked=False):
    u = urllib.parse.urlsplit(gw.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    h = {"api-key": KEY, "content-type": "application/json", **(headers or {})}
    if chunked:
        def chunks():
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]

        conn.request(method, path, body=chunks(), headers=h, encode_chunked=True)
    else:
        conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    data = r.read()
    out = (r.status, dict((k.lower(), v) for k, v in r.getheaders()), data)
    conn.close()
    return out


def big_chat_body(size):
    filler = "lorem ipsum " * (size // 12)
    return json.dumps(
        {"messages": [{"role": "user", "content": filler}], "max_tokens": 4}
    ).encode()


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_a_one_mebibyte_body_fails_over(start, chunked, stream):
    gw = start(config(THREE_SIMS, backend("eastus") + backend("westus") + backend("swedencentral"), EQUAL_POOL))
    body = json.loads(big_chat_body(1024 * 1024))
    body["stream"] = stream
    raw = json.dumps(body).encode()
    assert len(raw) > 1024 * 1024
    for _ in range(3):
        status, headers, data = _http(
            gw,
            "POST",
            CHAT,
            raw,
            {"x-sim-fault": "status=503", "x-sim-fault-region": "eastus,westus"},
            chunked=chunked,
        )
        assert status == 200, data[:300]
        assert headers["x-ms-region"] == "Sweden Central"
        assert headers["x-ms-stream"] == ("True" if stream else "False")
        if stream:
            assert b"data: [DONE]" in data
        else:
            assert json.loads(data)["choices"][0]["message"]["content"]
    # Every attempt reached a backend with the whole body: the failing
    # regions answered 503 (not a timeout waiting for missing bytes).
    assert metric(gw, "sluice_backend_attempts_total", outcome="503") >= 2
    assert metric(gw, "sluice_backend_attempts_total", outcome="timeout") == 0


def test_priority_order_is_honoured(start):
    pool = """      - {backend: eastus, priority: 1}
      - {backend: westus, priority: 2}
      - {backend: swedencentral, priority: 3}
"""
    gw = start(config(THREE_SIMS, backend("eastus") + backend("westus") + backend("swedencentral"), pool))
    c = client(gw)
    assert {chat(c)[1] for _ in range(10)} == {"East US"}
    # East US throttled: the next priority takes the call, never the third.
    h = {"x-sim-fault": "throttle=60000", "x-sim-fault-region": "eastus"}
    assert chat(client(gw, h))[1] == "West US"
    # East US now rests for its Retry-After (capped at 60 s): West US serves.
    assert {chat(c)[1] for _ in range(5)} == {"West US"}
    view = backends_view(gw)
    assert view["eastus"]["state"] == "open"
    assert view["eastus"]["open_because"]["rule"] == "throttled"


def test_weights_hold_within_ten_percent(start):
    pool = """      - {backend: eastus, weight: 5}
      - {backend: westus, weight: 3}
      - {backend: swedencentral, weight: 2}
"""
    gw = start(config(THREE_SIMS, backend("eastus") + backend("westus") + backend("swedencentral"), pool))
    counts = {}
    with httpx.Client(base_url=gw.url, headers={"api-key": KEY}, timeout=30) as h:
        body = {"input": "hello"}
        for _ in range(1000):
            r = h.post(
                f"/openai/deployments/text-embedding-3-small/embeddings?api-version={API_VERSION}",
                json=body,
            )
            assert r.status_code == 200
            region = r.headers["x-ms-region"]
            counts[region] = counts.get(region, 0) + 1
    for region, share in [("East US", 0.5), ("West US", 0.3), ("Sweden Central", 0.2)]:
        assert abs(counts[region] / 1000 - share) <= share * 0.10, counts


def test_a_resting_backend_takes_traffic_again_after_its_retry_after(start):
    pool = "      - {backend: eastus, priority: 1}\n      - {backend: westus, priority: 2}\n"
    gw = start(config(sim("eastus", "East US") + sim("westus", "West US"), backend("eastus") + backend("westus"), pool))
    c = client(gw)
    throttled = client(gw, {"x-sim-fault": "throttle=3000", "x-sim-fault-region": "eastus"})
    rested = time.monotonic()
    assert chat(throttled)[1] == "West US"
    # East US rests for its 3 s Retry-After: calls meanwhile go to West US.
    view = backends_view(gw)["eastus"]
    assert view["state"] == "open" and 0 < view["open_for_seconds"] <= 3, view
    assert view["open_because"]["retry_after_seconds"] == 3.0
    if time.monotonic() - rested < 2:
        assert chat(c)[1] == "West US"
    # Back to East US once the rest is over (polled, bounded).
    deadline = rested + 20
    region = None
    while time.monotonic() < deadline:
        region = chat(c)[1]
        if region == "East US":
            break
        time.sleep(0.05)
    assert region == "East US"
    assert time.monotonic() - rested >= 2.9
    assert backends_view(gw)["eastus"]["state"] == "closed"


def test_all_exhausted_gives_429_with_the_smallest_retry_after(start):
    gw = start(config(THREE_SIMS, backend("eastus") + backend("westus") + backend("swedencentral"), EQUAL_POOL))
    # Each region throttles with its own wait (control endpoint, once each).
    for name, ms in [("eastus", 30000), ("westus", 7000), ("swedencentral", 20000)]:
        r = httpx.post(f"{gw.simulators[name]}/_sim/fault", json={"fault": f"throttle={ms}", "times": 1}, timeout=10)
        assert r.status_code == 200
    status, headers, data = _http(gw, "POST", CHAT, json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
    # The smallest wait of the three, from the gateway (APIM's shape) or
    # from West US itself when it was tried last (Azure's shape).
    assert status == 429
    assert 6 <= int(headers["retry-after"]) <= 7, headers
    # Later calls are answered at once by the gateway, with the rest left.
    status, headers, data = _http(gw, "POST", CHAT, json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
    assert status == 429 and int(headers["retry-after"]) <= 7
    body = json.loads(data)
    assert body["statusCode"] == 429
    assert "pool main" in body["message"]
    # The SDK sees a RateLimitError it can retry on.
    import openai

    with pytest.raises(openai.RateLimitError):
        chat(client(gw))
    assert metric(gw, "sluice_pool_exhausted_total", pool="main") >= 2


def test_exhausted_can_answer_in_apims_503_shape(start):
    gw = start(
        config(
            sim("eastus", "East US"),
            backend("eastus"),
            "      - {backend: eastus}\n",
            api_extra="    failover: {when_exhausted: 503}\n",
        )
    )
    h = {"x-sim-fault": "throttle=5000"}
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    # The only backend throttles: its own 429 passes through ...
    status, headers, data = _http(gw, "POST", CHAT, body, h)
    assert status == 429 and headers["retry-after"] == "5", (status, headers)
    assert json.loads(data)["error"]["code"] == "429"
    # While it rests, the gateway answers at once, with the rest left.
    status, headers, data = _http(gw, "POST", CHAT, body)
    assert status == 503
    assert 1 <= int(headers["retry-after"]) <= 5
    assert "temporarily unavailable" in json.loads(data)["message"]


def test_state_creating_calls_fail_over_only_when_the_backend_did_not_act(start):
    pool = "      - {backend: eastus, priority: 1}\n      - {backend: westus, priority: 2}\n"
    gw = start(config(sim("eastus", "East US") + sim("westus", "West US"), backend("eastus") + backend("westus"), pool))
    # A 500 on a file upload is not retried: the client sees it.
    h = {"x-sim-fault": "status=500", "x-sim-fault-region": "eastus"}
    status, _, _ = _http(gw, "POST", f"/openai/files?api-version={API_VERSION}", b"{}", h)
    assert status == 500
    # A 429 is: the backend did nothing.
    h = {"x-sim-fault": "throttle=1000", "x-sim-fault-region": "eastus"}
    status, headers, _ = _http(gw, "POST", f"/openai/files?api-version={API_VERSION}", b"{}", h)
    assert headers.get("x-ms-region") == "West US", (status, headers)


def test_a_started_stream_is_never_retried(start):
    pool = "      - {backend: eastus, priority: 1}\n      - {backend: westus, priority: 2}\n"
    gw = start(config(sim("eastus", "East US") + sim("westus", "West US"), backend("eastus") + backend("westus"), pool))
    c = client(gw)
    # A healthy stream from East US: one attempt.
    text, region = chat(c, stream=True)
    assert text and region == "East US"
    assert metric(gw, "sluice_backend_attempts_total", backend="westus") == 0


def test_steering_avoids_429s_that_weighted_routing_gets(start):
    # Two regions with very different token limits and equal weights. Each
    # call asks for many tokens: the small region fills after a few calls.
    sims = sim("big", "East US", "    tokens_per_minute: 10000000\n") + sim(
        "small", "West US", "    tokens_per_minute: 3000\n"
    )
    backends = backend("big") + backend("small")

    def run(steering):
        pool_yaml = "      - {backend: big}\n      - {backend: small}\n"
        cfg = config(sims, backends, pool_yaml).replace(
            "  - name: main\n", f"  - name: main\n    steering: {str(steering).lower()}\n"
        )
        gw = start(cfg)
        c = httpx.Client(base_url=gw.url, headers={"api-key": KEY}, timeout=30)
        body = {"messages": [{"role": "user", "content": "hi " * 50}], "max_tokens": 400}
        throttled = 0
        for _ in range(30):
            r = c.post(CHAT, json=body)
            assert r.status_code == 200, r.text
        throttled = metric(gw, "sluice_backend_attempts_total", backend="small", outcome="429")
        c.close()
        gw.stop()
        return throttled

    plain = run(False)
    steered = run(True)
    # Plain weighted routing sends a call to the full region, which answers
    # 429 (the client never sees it: failover, then the region rests);
    # steering reads the region's rate-limit headers and never sends it one.
    assert plain >= 1, plain
    assert steered == 0, steered


@pytest.mark.parametrize("fault", ["hang", "slow-first-byte=5000", "close"])
def test_a_large_body_fails_over_on_timeouts_and_closed_connections(start, fault):
    # The gateway runs these attempts itself (body over 64 KiB): the
    # backends' read timeouts apply there too.
    short = "    timeouts: {read_ms: 500}\n"
    gw = start(
        config(
            THREE_SIMS,
            backend("eastus", short) + backend("westus", short) + backend("swedencentral"),
            EQUAL_POOL,
        )
    )
    raw = big_chat_body(200 * 1024)
    h = {"x-sim-fault": fault, "x-sim-fault-region": "eastus,westus"}
    for _ in range(3):
        status, headers, data = _http(gw, "POST", CHAT, raw, h)
        assert status == 200, data[:300]
        assert headers["x-ms-region"] == "Sweden Central"
    view = backends_view(gw)
    assert all(b["in_flight"] == 0 for b in view.values()), view
    assert metric(gw, "sluice_body_buffer_bytes") == 0


def test_a_client_that_leaves_during_a_large_body_attempt_frees_everything(start):
    short = "    timeouts: {read_ms: 60000}\n"
    gw = start(config(sim("eastus", "East US"), backend("eastus", short), "      - {backend: eastus}\n"))
    raw = big_chat_body(200 * 1024)
    u = urllib.parse.urlsplit(gw.url)
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\napi-key: {KEY}\r\nContent-Type: application/json\r\n"
        f"x-sim-fault: hang\r\nContent-Length: {len(raw)}\r\n\r\n"
    ).encode()
    s.sendall(head + raw)
    # The attempt is under way (the backend hangs) ...
    deadline = time.monotonic() + 10
    while backends_view(gw)["eastus"]["in_flight"] != 1:
        assert time.monotonic() < deadline, "the attempt never started"
        time.sleep(0.02)
    # ... the client goes: the gateway notices and lets go of it all.
    s.close()
    deadline = time.monotonic() + 10
    while True:
        view = backends_view(gw)["eastus"]
        if view["in_flight"] == 0 and metric(gw, "sluice_body_buffer_bytes") == 0:
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.02)


def test_backends_needs_an_operator_token(start):
    gw = start(config(sim("eastus", "East US"), backend("eastus"), "      - {backend: eastus}\n"))
    url = f"{gw.management}/backends"
    for headers in [
        {},
        {"authorization": "Bearer wrong-token-0123456789"},
        {"authorization": f"Basic {OPERATOR}"},
        {"api-key": KEY},  # a subscription key never opens it
        {"authorization": f"Bearer {KEY}"},
    ]:
        r = httpx.get(url, headers=headers, timeout=10)
        assert r.status_code == 401, (headers, r.status_code)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "Unauthorized"
        assert OPERATOR not in r.text
    r = httpx.get(url, headers={"authorization": f"Bearer {OPERATOR}"}, timeout=10)
    assert r.status_code == 200 and r.json()["backends"][0]["name"] == "eastus"
    # Scrapers and probes need nothing.
    assert httpx.get(f"{gw.management}/metrics", timeout=10).status_code == 200
    assert httpx.get(f"{gw.management}/health", timeout=10).status_code == 200
    # Unknown paths are not revealed without a token.
    assert httpx.get(f"{gw.management}/nope", timeout=10).status_code == 401
    r = httpx.get(f"{gw.management}/nope", headers={"authorization": f"Bearer {OPERATOR}"}, timeout=10)
    assert r.status_code == 404
