"""Issue 8: request traces as in APIM. Debug credentials from
listDebugCredentials, traced requests (Apim-Debug-Authorization ->
Apim-Trace-Id), listTrace, the request summaries at GET /traces, and the
management listener's operator authentication (tokens and Entra ID)."""

import base64
import json

import httpx
import pytest

from conftest import start_gateway

OPERATOR = "tracing-operator-token-0123456789"
SIGNING = "tracing-signing-key-0123456789abcdef"
APIM_PREFIX = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.ApiManagement/service/gw"

CONFIG = """
server:
  listen: 127.0.0.1:0
  threads: 2
  management:
    listen: 127.0.0.1:0
    operator_tokens: [{file: operator.token}]
    debug_signing_key: {file: signing.key}
simulators:
  - name: eastus
    region: East US
backends:
  - name: eastus
    simulator: eastus
apis:
  - name: aoai
    path: /openai
    backends: [eastus]
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    d = tmp_path_factory.mktemp("tracing")
    (d / "operator.token").write_text(OPERATOR)
    (d / "signing.key").write_text(SIGNING)
    g = start_gateway(d, CONFIG)
    yield g
    g.stop()


def claims(token):
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def list_credentials(gw, body, prefix=APIM_PREFIX, token=OPERATOR):
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(
        f"{gw.management}{prefix}/gateways/managed/listDebugCredentials?api-version=2023-05-01-preview",
        headers=headers,
        content=body if isinstance(body, bytes) else json.dumps(body).encode(),
        timeout=10,
    )


def test_list_debug_credentials_as_in_the_apim_labs(gw):
    body = {
        "credentialsExpireAfter": "PT1H",
        "apiId": f"{APIM_PREFIX}/apis/aoai",
        "purposes": ["tracing"],
    }
    r = list_credentials(gw, body)
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    c = claims(token)
    assert (c["aid"], c["p"], c["iss"]) == ("aoai", "tracing", "sluice")
    assert c["exp"] - c["iat"] == 3600
    assert SIGNING not in r.text and OPERATOR not in r.text
    # A short-form id and a shorter life; any prefix works.
    r = list_credentials(gw, {"credentialsExpireAfter": "PT5M", "apiId": "/apis/aoai", "purposes": ["tracing"]}, prefix="")
    assert r.status_code == 200
    c = claims(r.json()["token"])
    assert c["exp"] - c["iat"] == 300
    # Without credentialsExpireAfter: an hour.
    r = list_credentials(gw, {"apiId": "aoai", "purposes": ["tracing"]})
    assert claims(r.json()["token"])["exp"] - claims(r.json()["token"])["iat"] == 3600


@pytest.mark.parametrize(
    "body, status",
    [
        ({"credentialsExpireAfter": "PT2H", "apiId": "/apis/aoai", "purposes": ["tracing"]}, 400),
        ({"credentialsExpireAfter": "P1Y", "apiId": "/apis/aoai", "purposes": ["tracing"]}, 400),
        ({"credentialsExpireAfter": 3600, "apiId": "/apis/aoai", "purposes": ["tracing"]}, 400),
        ({"apiId": "/apis/aoai"}, 400),
        ({"apiId": "/apis/aoai", "purposes": ["other"]}, 400),
        ({"purposes": ["tracing"]}, 400),
        ({"apiId": "/apis/nope", "purposes": ["tracing"]}, 404),
        (b"not json", 400),
    ],
)
def test_bad_requests_get_the_management_error_shape(gw, body, status):
    r = list_credentials(gw, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] in ("ValidationError", "NotFound") and err["message"]


def test_credentials_need_an_operator(gw):
    body = {"apiId": "/apis/aoai", "purposes": ["tracing"]}
    assert list_credentials(gw, body, token=None).status_code == 401
    assert list_credentials(gw, body, token="not-the-operator-token-000").status_code == 401


def test_no_secret_reaches_the_log_at_trace_level_in_the_new_flows(tmp_path):
    """Failover (small body through pingora, large body through the
    gateway's own attempts), /backends and listDebugCredentials, with the
    log at trace: no key or token is in it."""
    key = "trace-leak-subscription-key-0123"
    backend_key = "trace-leak-backend-key-456789"
    for name, value in [("operator.token", OPERATOR), ("signing.key", SIGNING), ("a.key", key), ("backend.key", backend_key)]:
        (tmp_path / name).write_text(value)
    config = CONFIG.replace(
        """simulators:
  - name: eastus
    region: East US
backends:
  - name: eastus
    simulator: eastus
apis:
  - name: aoai
    path: /openai
    backends: [eastus]
""",
        """simulators:
  - {name: eastus, region: East US, api_key: {file: backend.key}}
  - {name: westus, region: West US, api_key: {file: backend.key}}
backends:
  - {name: eastus, simulator: eastus, api_key: {file: backend.key}}
  - {name: westus, simulator: westus, api_key: {file: backend.key}}
subscriptions:
  - {name: t, primary_key: {file: a.key}}
apis:
  - name: aoai
    path: /openai
    backends: [eastus, westus]
""",
    )
    gw = start_gateway(tmp_path, config, env={"RUST_LOG": "trace"})
    try:
        chat = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        fault = {"api-key": key, "x-sim-fault": "status=503", "x-sim-fault-region": "eastus"}
        small = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        large = {"messages": [{"role": "user", "content": "x" * 200_000}], "max_tokens": 4}
        for body in [small, large, {**small, "stream": True}]:
            r = httpx.post(f"{gw.url}{chat}", json=body, headers=fault, timeout=30)
            assert r.status_code == 200, r.text[:200]
        op = {"authorization": f"Bearer {OPERATOR}"}
        assert httpx.get(f"{gw.management}/backends", headers=op, timeout=10).status_code == 200
        r = list_credentials(gw, {"apiId": "/apis/aoai", "purposes": ["tracing"]})
        debug_token = r.json()["token"]
        assert list_credentials(gw, {"apiId": "/apis/aoai", "purposes": ["tracing"]}, token="wrong-operator-token-000").status_code == 401
        # Traced requests (failing over, refused, streamed), their traces,
        # the summaries, and a v1 call with the key as a bearer.
        traced = {**fault, "apim-debug-authorization": debug_token}
        ids = []
        for body in [small, large, {**small, "stream": True}]:
            r = httpx.post(f"{gw.url}{chat}", json=body, headers=traced, timeout=30)
            assert r.status_code == 200
            ids.append(r.headers["apim-trace-id"])
        r = httpx.post(f"{gw.url}{chat}&subscription-key={key}", json=small, timeout=30,
                       headers={"apim-debug-authorization": debug_token})
        assert r.status_code == 200
        ids.append(r.headers["apim-trace-id"])
        r = httpx.post(f"{gw.url}{chat}", json=small, timeout=30,
                       headers={"api-key": "wrong-key-0000", "apim-debug-authorization": debug_token})
        assert r.status_code == 401
        ids.append(r.headers["apim-trace-id"])
        for i in ids:
            t = list_trace(gw, i)
            assert t.status_code == 200
            for secret in [key, backend_key, OPERATOR, SIGNING, debug_token]:
                assert secret not in t.text
        assert httpx.get(f"{gw.management}/traces", headers=op, timeout=10).status_code == 200
        assert httpx.get(f"{gw.management}/viewer", timeout=10).status_code == 200
        r = httpx.post(f"{gw.url}/openai/v1/chat/completions", timeout=30,
                       json={**small, "model": "gpt-4o"}, headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        # Issue 9's flows: Responses (JSON, then a streamed follow-up pinned
        # by previous_response_id), a stored file read back, an id sought
        # across the backends, and the models list; traced too.
        bearer = {"authorization": f"Bearer {key}"}
        r = httpx.post(f"{gw.url}/openai/v1/responses", timeout=30, headers=bearer,
                       json={"model": "gpt-4o", "input": "hi", "max_output_tokens": 4})
        assert r.status_code == 200, r.text
        r = httpx.post(f"{gw.url}/openai/v1/responses", timeout=30,
                       headers={**bearer, "apim-debug-authorization": debug_token},
                       json={"model": "gpt-4o", "input": "more", "stream": True,
                             "previous_response_id": r.json()["id"]})
        assert r.status_code == 200 and "response.completed" in r.text
        t = list_trace(gw, r.headers["apim-trace-id"])
        for secret in [key, backend_key, OPERATOR, SIGNING, debug_token]:
            assert secret not in t.text
        f = httpx.post(f"{gw.url}/openai/v1/files", timeout=30, headers=bearer,
                       files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "batch"})
        assert f.status_code == 200, f.text
        r = httpx.get(f"{gw.url}/openai/v1/files/{f.json()['id']}/content", timeout=30, headers=bearer)
        assert r.content == b"{}\n"
        r = httpx.get(f"{gw.url}/openai/v1/responses/resp_{'0' * 32}", timeout=30, headers=bearer)
        assert r.status_code == 404
        assert httpx.get(f"{gw.url}/openai/v1/models", timeout=30, headers=bearer).status_code == 200
        # Issue 10's flows: a traced Realtime session whose key is in the
        # query (as a browser sends it), one refused, and a streamed
        # multipart upload routed by its `model` field.
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect as ws_connect

        ws_base = gw.url.replace("http://", "ws://") + "/openai/v1/realtime?model=gpt-rt"
        with ws_connect(f"{ws_base}&api-key={key}", open_timeout=10,
                        additional_headers={"apim-debug-authorization": debug_token}) as ws:
            trace_id = ws.response.headers["apim-trace-id"]
            ws.send('{"type":"response.create"}')
            while '"response.done"' not in ws.recv(timeout=10):
                pass
        t = list_trace(gw, trace_id)
        assert t.status_code == 200 and "websocket" in t.text
        for secret in [key, backend_key, OPERATOR, SIGNING, debug_token]:
            assert secret not in t.text
        with pytest.raises(InvalidStatus):
            ws_connect(f"{ws_base}&api-key=wrong-key-1111", open_timeout=10)
        r = httpx.post(f"{gw.url}/openai/v1/audio/transcriptions", timeout=30, headers=bearer,
                       files={"file": ("a.wav", b"RIFF" + b"\0" * 200_000)}, data={"model": "whisper"})
        assert r.status_code == 200, r.text
    finally:
        gw.stop()
    log = (tmp_path / "sluice.log").read_text()
    assert " DEBUG " in log, "the log is at trace level (debug and below on)"
    for secret in [key, backend_key, OPERATOR, SIGNING, debug_token]:
        assert secret not in log, f"a secret is in the log: {secret[:6]}..."


# --- traced requests, listTrace, summaries ------------------------------------------------

import re
import time

import jwt as pyjwt
import openai

from fakes import CaptureBackend, FakeEntra

SUB_KEY = "trace-subscription-key-0123456789"
OTHER_KEY = "trace-other-subscription-key-9876"
BACKEND_KEY = "trace-backend-key-abcdef012345"
CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z$")
ELAPSED = re.compile(r"^\d\d:\d\d:\d\d\.\d{7}$")

FULL = """
server:
  listen: 127.0.0.1:0
  threads: 2
  management:
    listen: 127.0.0.1:0
    operator_tokens: [{file: operator.token}]
    debug_signing_key: {file: signing.key}
    entra_id:
      openid_config_url: ENTRA_OPENID
      issuers: [ENTRA_ISSUER]
      audiences: [api://sluice-operators]
      required_roles: [Sluice.Operator]
    tracing:
      max_traces: 5
      body_bytes: BODY_BYTES
      redact_headers: [x-team-secret]
simulators:
  - {name: eastus, region: East US, api_key: {file: backend.key}}
  - {name: westus, region: West US, api_key: {file: backend.key}}
backends:
  - {name: eastus, simulator: eastus, api_key: {file: backend.key}}
  - {name: westus, simulator: westus, api_key: {file: backend.key}}
  - {name: capture, url: CAPTURE_URL}
subscriptions:
  - {name: team-a, primary_key: {file: a.key}}
  - {name: team-b, primary_key: {file: b.key}}
apis:
  - name: aoai
    path: /openai
    backends: [eastus, westus]
    policies:
      - token_limit: {counter_key: subscription, tokens_per_minute: 100000, estimate_prompt_tokens: true}
  - name: limited
    path: /limited/openai
    backends: [eastus]
    policies:
      - rate_limit: {calls: 1, renewal_period_seconds: 60, counter_key: subscription}
  - name: captured
    path: /captured/openai
    backends: [capture]
  - name: entra
    path: /entra/openai
    backends: [capture]
    auth: jwt
    policies:
      - validate_jwt:
          openid_config_url: ENTRA_OPENID
          issuers: [ENTRA_ISSUER]
          audiences: [https://cognitiveservices.azure.com]
          required_roles: [Chat.User]
"""


def _start_full(d, body_bytes=0, extra_server=""):
    entra = FakeEntra()
    capture = CaptureBackend()
    for name, value in [("operator.token", OPERATOR), ("signing.key", SIGNING), ("a.key", SUB_KEY),
                        ("b.key", OTHER_KEY), ("backend.key", BACKEND_KEY)]:
        (d / name).write_text(value)
    config = (FULL.replace("ENTRA_OPENID", entra.openid_url).replace("ENTRA_ISSUER", entra.issuer)
              .replace("CAPTURE_URL", capture.url).replace("BODY_BYTES", str(body_bytes))
              .replace("  threads: 2\n", "  threads: 2\n" + extra_server))
    return start_gateway(d, config), entra, capture


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    g, entra, capture = _start_full(tmp_path_factory.mktemp("traces"))
    g.entra = entra
    g.capture = capture
    yield g
    g.stop()
    entra.server.stop()
    capture.stop()


def op_headers(token=OPERATOR):
    return {"authorization": f"Bearer {token}"}


def debug_token(gw, api="aoai"):
    r = list_credentials(gw, {"credentialsExpireAfter": "PT1H", "apiId": f"{APIM_PREFIX}/apis/{api}", "purposes": ["tracing"]})
    assert r.status_code == 200, r.text
    return r.json()["token"]


def list_trace(gw, trace_id, prefix=APIM_PREFIX):
    return httpx.post(
        f"{gw.management}{prefix}/gateways/managed/listTrace?api-version=2024-06-01-preview",
        headers=op_headers(),
        json={"traceId": trace_id},
        timeout=15,
    )


def sources(trace, section):
    return [e["source"] for e in trace["traceEntries"].get(section, [])]


def entries(trace, section, source):
    return [e["data"] for e in trace["traceEntries"].get(section, []) if e["source"] == source]


def test_the_lab_flow_in_plain_http(full):
    token = debug_token(full)
    r = httpx.post(f"{full.url}{CHAT}", timeout=30,
                   headers={"api-key": SUB_KEY, "Apim-Debug-Authorization": token, "x-team-secret": "hush-123"},
                   json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5})
    assert r.status_code == 200, r.text
    trace_id = r.headers["apim-trace-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    t = list_trace(full, trace_id)
    assert t.status_code == 200, t.text
    trace = t.json()
    assert trace["serviceName"] == "sluice" and trace["traceId"] == trace_id
    assert set(trace["traceEntries"]) == {"inbound", "backend", "outbound"}
    for section in trace["traceEntries"].values():
        for e in section:
            assert set(e) == {"source", "timestamp", "elapsed", "data"}
            assert TIMESTAMP.match(e["timestamp"]) and ELAPSED.match(e["elapsed"]), e
    # Inbound: the request, the matched API and operation, each decision.
    request = entries(trace, "inbound", "api-inspector")[0]["request"]
    assert request["method"] == "POST" and request["url"].endswith(CHAT)
    config = entries(trace, "inbound", "api-inspector")[1]["configuration"]
    assert config["api"]["name"] == "aoai"
    assert config["operation"]["uriTemplate"] == "/deployments/{deployment-id}/chat/completions"
    key = entries(trace, "inbound", "subscription-key")[0]
    assert key["subscription"] == "team-a" and key["key"] == "primary"
    limits = entries(trace, "inbound", "llm-token-limit")
    assert limits[0]["estimatedPromptTokens"] > 0 and limits[1]["result"] == "accepted"
    assert limits[1]["limit"] == 100000 and limits[1]["remaining"] < 100000
    # Backend: which backend, what was sent, what came back.
    chosen = entries(trace, "backend", "set-backend-service")[0]
    assert chosen["backend"] in ("eastus", "westus") and chosen["region"] in ("East US", "West US")
    sent = entries(trace, "backend", "request-forwarder")[0]["request"]
    sent_headers = {h["name"]: h["value"] for h in sent["headers"]}
    assert sent_headers["api-key"] == "<redacted>"
    assert "apim-debug-authorization" not in sent_headers
    assert entries(trace, "backend", "forward-request")[0]["response"]["status"]["code"] == 200
    # Outbound: status, headers, usage.
    assert sources(trace, "outbound")[-1] == "transfer-response"
    usage = entries(trace, "outbound", "llm-token-usage")[0]
    assert usage["totalTokens"] == r.json()["usage"]["total_tokens"]
    # Secrets never stored: the keys, the debug token, configured headers.
    text = t.text
    for secret in [SUB_KEY, BACKEND_KEY, token, OPERATOR, SIGNING, "hush-123"]:
        assert secret not in text, secret[:8]
    # The message comes first in an entry's object, as APIM writes it.
    assert '"data":{"message":"The subscription key was accepted."' in text
    # The summary lists the traced request with its trace id.
    s = httpx.get(f"{full.management}/traces?traced=true", headers=op_headers(), timeout=10).json()
    mine = [x for x in s["summaries"] if x["traceId"] == trace_id]
    assert mine and mine[0]["subscription"] == "team-a" and mine[0]["status"] == 200
    assert mine[0]["totalTokens"] == usage["totalTokens"] and mine[0]["deployment"] == "gpt-4o"
    # The same trace at GET /traces/{id}.
    g = httpx.get(f"{full.management}/traces/{trace_id}", headers=op_headers(), timeout=10)
    assert g.status_code == 200 and g.json()["traceId"] == trace_id


def test_a_stream_through_the_sdk_with_raw_response(full):
    token = debug_token(full)
    client = openai.AzureOpenAI(azure_endpoint=full.url, api_key=SUB_KEY, api_version="2024-10-21", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Tell me a story"}], stream=True,
        extra_headers={"Apim-Debug-Authorization": token})
    trace_id = raw.headers["apim-trace-id"]
    assert raw.headers["x-ms-stream"] == "True"
    chunks = list(raw.parse())
    assert len(chunks) > 3
    # Asked right after the stream ended: complete (the store waits for it).
    trace = list_trace(full, trace_id).json()
    end = entries(trace, "outbound", "transfer-response")[-1]
    assert end["message"] == "Response has been sent to the caller in full."
    # Each SSE event, [DONE] included; the SDK shows the data chunks.
    assert end["events"] >= len(chunks)
    assert 0 < end["timeToFirstEventMs"] <= end["durationMs"]
    assert entries(trace, "outbound", "llm-token-usage")[0]["completionTokens"] > 0


def test_expired_and_wrong_api_credentials_are_served_untraced(full):
    now = int(time.time())
    expired = pyjwt.encode({"aid": "aoai", "p": "tracing", "iat": now - 7200, "exp": now - 3600, "iss": "sluice"},
                           SIGNING, algorithm="HS256")
    r = httpx.post(f"{full.url}{CHAT}", json={"messages": [{"role": "user", "content": "hi"}]},
                   headers={"api-key": SUB_KEY, "Apim-Debug-Authorization": expired}, timeout=30)
    assert r.status_code == 200
    assert "apim-trace-id" not in r.headers
    assert "expired" in r.headers["apim-debug-authorization-expired"]
    wrong = debug_token(full, api="limited")
    r = httpx.post(f"{full.url}{CHAT}", json={"messages": [{"role": "user", "content": "hi"}]},
                   headers={"api-key": SUB_KEY, "Apim-Debug-Authorization": wrong}, timeout=30)
    assert r.status_code == 200
    assert "apim-trace-id" not in r.headers
    assert "'limited'" in r.headers["apim-debug-authorization-wrongapi"]
    # A token this gateway never signed opens nothing either.
    forged = pyjwt.encode({"aid": "aoai", "p": "tracing", "iat": now, "exp": now + 600, "iss": "sluice"},
                          "another-key-0123456789abcdef0123", algorithm="HS256")
    r = httpx.post(f"{full.url}{CHAT}", json={"messages": [{"role": "user", "content": "hi"}]},
                   headers={"api-key": SUB_KEY, "Apim-Debug-Authorization": forged}, timeout=30)
    assert r.status_code == 200 and "apim-trace-id" not in r.headers


def test_a_key_in_the_query_string_is_redacted_even_encoded(full):
    token = debug_token(full)
    for name in ["subscription-key", "subscription%2Dkey", "%73ubscription-key"]:
        r = httpx.post(f"{full.url}{CHAT}&{name}={SUB_KEY}", json={"messages": [{"role": "user", "content": "hi"}]},
                       headers={"Apim-Debug-Authorization": token}, timeout=30)
        assert r.status_code == 200, (name, r.text)
        t = list_trace(full, r.headers["apim-trace-id"])
        assert SUB_KEY not in t.text, name
        assert f"{name}=<redacted>" in entries(t.json(), "inbound", "api-inspector")[0]["request"]["url"]


def test_refused_requests_are_traced(full):
    token = debug_token(full)
    r = httpx.post(f"{full.url}{CHAT}", json={"messages": []},
                   headers={"api-key": "not-a-key-of-anyone-000000", "Apim-Debug-Authorization": token}, timeout=30)
    assert r.status_code == 401
    trace = list_trace(full, r.headers["apim-trace-id"]).json()
    assert entries(trace, "inbound", "subscription-key")[0]["result"] == "refused"
    err = entries(trace, "on-error", "gateway")[0]
    assert err["status"] == 401 and "invalid subscription key" in err["message"]
    assert "backend" not in trace["traceEntries"]
    assert "not-a-key-of-anyone" not in json.dumps(trace)
    # A 429 from a rate limit, on another API with its own credential.
    token = debug_token(full, api="limited")
    url = f"{full.url}/limited{CHAT}"
    codes = []
    for _ in range(2):
        r = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}]},
                       headers={"api-key": OTHER_KEY, "Apim-Debug-Authorization": token}, timeout=30)
        codes.append(r.status_code)
    assert codes == [200, 429]
    trace = list_trace(full, r.headers["apim-trace-id"]).json()
    limit = entries(trace, "inbound", "rate-limit")[0]
    assert limit["result"] == "refused" and limit["limit"] == 1 and limit["retryAfterSeconds"] > 0
    assert entries(trace, "on-error", "gateway")[0]["status"] == 429


def test_failover_shows_every_attempt(full):
    token = debug_token(full)
    r = httpx.post(f"{full.url}{CHAT}", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30,
                   headers={"api-key": SUB_KEY, "Apim-Debug-Authorization": token,
                            "x-sim-fault": "status=503", "x-sim-fault-region": "eastus"})
    assert r.status_code == 200
    trace = list_trace(full, r.headers["apim-trace-id"]).json()
    chosen = entries(trace, "backend", "set-backend-service")
    if len(chosen) == 1:
        assert chosen[0]["backend"] == "westus"  # the breaker had already rested eastus
        return
    assert [c["backend"] for c in chosen] == ["eastus", "westus"]
    codes = [e["response"]["status"]["code"] for e in entries(trace, "backend", "forward-request")]
    assert codes == [503, 200]
    assert "failed (503)" in entries(trace, "backend", "failover")[0]["message"]


def test_the_debug_header_never_reaches_a_backend(full):
    token = debug_token(full, api="captured")
    r = httpx.post(f"{full.url}/captured{CHAT}", json={"messages": [{"role": "user", "content": "hi"}]},
                   headers={"api-key": SUB_KEY, "Apim-Debug-Authorization": token}, timeout=30)
    assert r.status_code == 200 and "apim-trace-id" in r.headers
    _, headers = full.capture.requests[-1]
    assert not any(h.lower() == "apim-debug-authorization" for h in headers)
    assert token not in json.dumps(headers)


def test_jwt_decisions_are_traced_without_the_token(full):
    token = debug_token(full, api="entra")
    jwt = full.entra.token(roles=["Chat.User"])
    url = f"{full.url}/entra{CHAT}"
    body = {"messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(url, json=body, timeout=30,
                   headers={"authorization": f"Bearer {jwt}", "Apim-Debug-Authorization": token})
    assert r.status_code == 200, r.text
    t = list_trace(full, r.headers["apim-trace-id"])
    accepted = entries(t.json(), "inbound", "validate-jwt")[0]
    assert accepted["message"] == "The JWT was validated."
    assert accepted["appId"] == FakeEntra.APP_ID and accepted["roles"] == ["Chat.User"]
    assert accepted["requiredRoles"] == ["Chat.User"] and accepted["issuer"] == full.entra.issuer
    headers = {h["name"]: h["value"] for h in entries(t.json(), "inbound", "api-inspector")[0]["request"]["headers"]}
    assert headers["authorization"] == "Bearer <redacted>"
    assert jwt not in t.text and jwt.split(".")[2] not in t.text
    # Without the role: refused, and the trace says why.
    r = httpx.post(url, json=body, timeout=30,
                   headers={"authorization": f"Bearer {full.entra.token(roles=['Other'])}",
                            "Apim-Debug-Authorization": token})
    assert r.status_code == 401
    refused = entries(list_trace(full, r.headers["apim-trace-id"]).json(), "inbound", "validate-jwt")[0]
    assert refused == {"message": "JWT is missing a required role.", "result": "refused"}


def test_unknown_trace_ids_and_bad_list_trace_requests(full):
    r = list_trace(full, "0123456789abcdef0123456789abcdef")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NotFound"
    r = httpx.post(f"{full.management}/gateways/managed/listTrace", headers=op_headers(), content=b"{}", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "ValidationError"
    r = httpx.get(f"{full.management}/traces/nope", headers=op_headers(), timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.post(f"{full.management}/gateways/managed/listTrace", json={"traceId": "x"}, timeout=10)
    assert r.status_code == 401


def test_summaries_are_filtered(full):
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{full.url}{CHAT}", json=body, headers={"api-key": OTHER_KEY}, timeout=30).status_code == 200
    assert httpx.post(f"{full.url}{CHAT}", json=body, headers={"api-key": "nobody-000000"}, timeout=30).status_code == 401
    get = lambda q: httpx.get(f"{full.management}/traces?{q}", headers=op_headers(), timeout=10)
    team_b = get("subscription=team-b").json()["summaries"]
    assert team_b and all(s["subscription"] == "team-b" for s in team_b)
    refused = get("status=4xx&since=PT5M").json()["summaries"]
    assert refused and all(400 <= s["status"] < 500 for s in refused)
    assert any(s["status"] == 401 and s["subscription"] is None for s in refused)
    newest = get("deployment=gpt-4o&limit=1").json()["summaries"]
    assert len(newest) == 1
    assert get("since=2999-01-01T00:00:00Z").json()["summaries"] == []
    for bad in ["status=abc", "since=yesterday", "limit=0", "colour=red"]:
        r = get(bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == "ValidationError", bad
    # Summaries carry no secret either.
    assert OTHER_KEY not in get("").text


def test_the_store_is_bounded_under_a_flood(full):
    token = debug_token(full)
    ids = []
    with httpx.Client(timeout=30) as c:
        for _ in range(20):
            r = c.post(f"{full.url}{CHAT}", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                       headers={"api-key": SUB_KEY, "Apim-Debug-Authorization": token})
            ids.append(r.headers["apim-trace-id"])
    assert len(set(ids)) == 20
    found = [list_trace(full, i).status_code for i in ids]
    # max_traces is 5: the newest five are kept, the rest were evicted.
    assert found[-5:] == [200] * 5 and found[:15] == [404] * 15
    store = httpx.get(f"{full.management}/traces", headers=op_headers(), timeout=10).json()["store"]
    assert store["traces"] <= 5 and store["evicted"] >= 15


def test_management_authentication(full):
    url = f"{full.management}/traces"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"authorization": "Basic abc"}, timeout=10).status_code == 401
    # A subscription key never opens it, as a bearer or as api-key.
    assert httpx.get(url, headers=op_headers(SUB_KEY), timeout=10).status_code == 401
    assert httpx.get(url, headers={"api-key": SUB_KEY}, timeout=10).status_code == 401
    # Entra ID: the role opens it; a valid token without it is forbidden.
    entra = full.entra
    ok = entra.token(aud="api://sluice-operators", roles=["Sluice.Operator"])
    assert httpx.get(url, headers=op_headers(ok), timeout=10).status_code == 200
    r = httpx.get(url, headers=op_headers(entra.token(aud="api://sluice-operators", roles=["Reader"])), timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "Forbidden"
    r = httpx.get(url, headers=op_headers(entra.token(aud="api://someone-else", roles=["Sluice.Operator"])), timeout=10)
    assert r.status_code == 401 and "audience" in r.json()["error"]["message"]
    r = httpx.get(url, headers=op_headers(entra.token(aud="api://sluice-operators", roles=["Sluice.Operator"], exp_in=-600)), timeout=10)
    assert r.status_code == 401
    r = httpx.get(url, headers=op_headers(entra.token(aud="api://sluice-operators", roles=["Sluice.Operator"], key=entra.other_key)), timeout=10)
    assert r.status_code == 401
    # /metrics and /health stay open.
    assert httpx.get(f"{full.management}/health", timeout=10).status_code == 200
    assert httpx.get(f"{full.management}/metrics", timeout=10).status_code == 200


def test_bodies_are_recorded_only_when_configured(tmp_path, full):
    # Not configured (the module's gateway): sizes only.
    token = debug_token(full)
    secret_text = "the-body-says-0123"
    r = httpx.post(f"{full.url}{CHAT}", json={"messages": [{"role": "user", "content": secret_text}]},
                   headers={"api-key": SUB_KEY, "Apim-Debug-Authorization": token}, timeout=30)
    assert secret_text not in list_trace(full, r.headers["apim-trace-id"]).text
    # Configured: up to body_bytes of each, for traced requests only.
    # No room to hold bodies for failover: a large one streams to the backend.
    g, entra, capture = _start_full(tmp_path, body_bytes=40, extra_server="  body_buffer_bytes: 0\n")
    try:
        token = debug_token(g)
        r = httpx.post(f"{g.url}{CHAT}", json={"messages": [{"role": "user", "content": secret_text}]},
                       headers={"api-key": SUB_KEY, "Apim-Debug-Authorization": token}, timeout=30)
        trace = list_trace(g, r.headers["apim-trace-id"]).json()
        body = entries(trace, "inbound", "request-payload-handler")[0]["body"]
        assert body["truncated"] and len(body["text"]) == 40 and body["text"].startswith('{"messages"')
        out = entries(trace, "outbound", "transfer-response")[-1]["body"]
        assert out["text"] and out["bytes"] == len(r.content)
        summaries = httpx.get(f"{g.management}/traces", headers=op_headers(), timeout=10).text
        assert secret_text not in summaries
        # A body that streamed to the backend is recorded when it has ended.
        big = {"messages": [{"role": "user", "content": "y" * 100_000}], "max_tokens": 2}
        r = httpx.post(f"{g.url}{CHAT}", json=big, timeout=30,
                       headers={"api-key": SUB_KEY, "Apim-Debug-Authorization": token})
        assert r.status_code == 200, r.text
        trace = list_trace(g, r.headers["apim-trace-id"]).json()
        handler = entries(trace, "inbound", "request-payload-handler")[0]
        assert "streamed to the backend" in handler["message"]
        assert handler["body"]["bytes"] > 100_000 and len(handler["body"]["text"]) == 40
    finally:
        g.stop()
        entra.server.stop()
        capture.stop()
