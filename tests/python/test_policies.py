"""Issue 3 end to end: Entra ID callers (validate_jwt), managed identity to
the backend (inject_token), rate_limit, quota, token_limit and token
metrics, driven with the real openai SDK and plain HTTP."""

import json
import re
import time

import httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect
from openai import AzureOpenAI

from conftest import start_gateway
from fakes import CaptureBackend, FakeEntra, FakeManagedIdentity

API_VERSION = "2024-10-21"
KEY_A = "policies-team-a-key"
KEY_B = "policies-team-b-key"
KEY_C = "policies-team-c-key"
BACKEND_KEY = "policies-backend-key"
MI_TOKEN = "mi-token-issued-by-the-fake-endpoint"
TPM = 5000


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    entra = FakeEntra()
    mi = FakeManagedIdentity(MI_TOKEN)
    d = tmp_path_factory.mktemp("policies")
    for name, value in [("a.key", KEY_A), ("b.key", KEY_B), ("c.key", KEY_C), ("backend.key", BACKEND_KEY), ("mi.token", MI_TOKEN)]:
        (d / name).write_text(value)
    config = f"""
server:
  listen: 127.0.0.1:0
  threads: 2
  management:
    listen: 127.0.0.1:0
simulators:
  - name: entra-only
    region: East US
    api_key: {{file: mi.token}}
  - name: keyed
    region: West US
    api_key: {{file: backend.key}}
backends:
  - name: mi
    simulator: entra-only
    auth:
      managed_identity: {{}}
  - name: keyed
    simulator: keyed
    api_key: {{file: backend.key}}
subscriptions:
  - name: team-a
    primary_key: {{file: a.key}}
  - name: team-b
    primary_key: {{file: b.key}}
  - name: team-c
    primary_key: {{file: c.key}}
apis:
  - name: entra
    path: /entra/openai
    backends: [mi]
    auth: jwt
    policies:
      - validate_jwt:
          openid_config_url: {entra.openid_url}
          issuers: [{entra.issuer}]
          audiences: [{entra.AUDIENCE}]
          client_application_ids: [{entra.APP_ID}]
      - token_limit: {{counter_key: identity, tokens_per_minute: 100000}}
      - emit_token_metric: {{dimensions: [api, identity, deployment, backend_region]}}
  - name: either
    path: /either/openai
    backends: [keyed]
    auth: key_or_jwt
    policies:
      - validate_jwt:
          openid_config_url: {entra.openid_url}
          issuers: [{entra.issuer}]
          audiences: [{entra.AUDIENCE}]
  - name: limited
    path: /limited/openai
    backends: [keyed]
    policies:
      - rate_limit: {{calls: 3, renewal_period_seconds: 5, counter_key: subscription}}
  - name: quota
    path: /quota/openai
    backends: [keyed]
    policies:
      - quota: {{calls: 2, renewal_period_seconds: 3600, counter_key: subscription}}
  - name: tokens
    path: /tokens/openai
    backends: [keyed]
    policies:
      - token_limit:
          counter_key: subscription
          tokens_per_minute: {TPM}
          remaining_tokens_header_name: x-sluice-remaining-tokens
          tokens_consumed_header_name: x-sluice-consumed-tokens
      - emit_token_metric: {{dimensions: [subscription, api, deployment, backend_region]}}
  - name: tight
    path: /tight/openai
    backends: [keyed]
    policies:
      - token_limit: {{counter_key: subscription, tokens_per_minute: 60}}
  - name: big
    path: /big/openai
    backends: [keyed]
    policies:
      - token_limit:
          counter_key: subscription
          tokens_per_minute: 1000000
          remaining_tokens_header_name: x-sluice-remaining-tokens
          tokens_consumed_header_name: x-sluice-consumed-tokens
  - name: token-quota
    path: /token-quota/openai
    backends: [keyed]
    policies:
      - token_limit: {{counter_key: subscription, token_quota: 50, token_quota_period: hourly}}
"""
    gw = start_gateway(d, config, env={"IDENTITY_ENDPOINT": mi.endpoint, "IDENTITY_HEADER": mi.HEADER})
    yield {"gw": gw, "entra": entra, "mi": mi}
    gw.stop()
    entra.server.stop()
    mi.server.stop()


def sdk(env, prefix, key=None, token=None):
    kw = {"api_key": key} if key else {"azure_ad_token_provider": lambda: token}
    return AzureOpenAI(azure_endpoint=env["gw"].url + prefix, api_version=API_VERSION, max_retries=0, **kw)


CHAT = dict(model="gpt-4o", messages=[{"role": "user", "content": "Say something nice about canals"}])


# --- validate_jwt + inject_token -------------------------------------------------------------

def test_entra_id_callers_reach_a_managed_identity_backend(env):
    c = sdk(env, "/entra", token=env["entra"].token())
    r = c.chat.completions.create(max_tokens=5, **CHAT)
    assert r.usage.completion_tokens == 5
    raw = c.chat.completions.with_raw_response.create(max_tokens=4, stream=True, **CHAT)
    assert raw.headers["x-ms-stream"] == "True"
    assert "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices).strip()
    c.embeddings.create(model="text-embedding-3-small", input="hello")
    # The simulator behind `mi` accepts only the managed-identity token: the
    # client's JWT was replaced. The token was fetched once and cached.
    assert env["mi"].fetches() == 1
    assert env["mi"].resources == ["https://cognitiveservices.azure.com"]


@pytest.mark.parametrize(
    "case,message",
    [
        ("wrong_audience", "JWT audience is not allowed."),
        ("expired", "JWT has expired."),
        ("bad_signature", "JWT signature is invalid."),
        ("unknown_kid", "JWT signature key is unknown."),
        ("other_app", "JWT client application is not allowed."),
        ("missing", "JWT not present."),
    ],
)
def test_bad_tokens_get_401(env, case, message):
    e = env["entra"]
    token = {
        "wrong_audience": lambda: e.token(aud="api://someone-else"),
        "expired": lambda: e.token(exp_in=-3600),
        "bad_signature": lambda: e.token(key=e.other_key),
        "unknown_kid": lambda: e.token(kid="not-a-published-key"),
        "other_app": lambda: e.token(app_id="99999999-0000-0000-0000-000000000000"),
        "missing": lambda: None,
    }[case]()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.post(
        env["gw"].url + "/entra/openai/deployments/gpt-4o/chat/completions?api-version=" + API_VERSION,
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
        timeout=30,
    )
    assert r.status_code == 401, r.text
    assert r.json() == {"statusCode": 401, "message": message}
    if token:
        assert token not in r.text
    # The SDK sees an AuthenticationError too.
    if token:
        with pytest.raises(openai.AuthenticationError):
            sdk(env, "/entra", token=token).chat.completions.create(max_tokens=1, **CHAT)


def test_realtime_handshake_with_an_entra_id_token(env):
    # The Realtime WebSocket takes a bearer JWT at its handshake; the backend
    # gets the gateway's managed-identity token instead.
    url = env["gw"].url.replace("http://", "ws://") + (
        f"/entra/openai/realtime?api-version={API_VERSION}&deployment=gpt-rt"
    )
    token = env["entra"].token()
    with ws_connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        ws.send(json.dumps({"type": "response.create"}))
        while True:
            ev = json.loads(ws.recv(timeout=10))
            if ev["type"] == "response.done":
                assert ev["response"]["usage"]["total_tokens"] > 0
                break
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(url, additional_headers={"Authorization": f"Bearer {env['entra'].token(exp_in=-3600)}"})
    assert refused.value.response.status_code == 401
    assert json.loads(refused.value.response.body) == {"statusCode": 401, "message": "JWT has expired."}


def test_key_or_jwt_accepts_either(env):
    assert sdk(env, "/either", key=KEY_A).chat.completions.create(max_tokens=2, **CHAT).usage.total_tokens > 0
    assert sdk(env, "/either", token=env["entra"].token()).chat.completions.create(max_tokens=2, **CHAT).usage
    with pytest.raises(openai.AuthenticationError):
        sdk(env, "/either", key="wrong-key").chat.completions.create(max_tokens=1, **CHAT)
    r = httpx.post(env["gw"].url + "/either/openai/deployments/d/chat/completions", json={"messages": []}, timeout=30)
    assert r.status_code == 401 and r.json()["message"] == "JWT not present."


# --- rate_limit and quota ------------------------------------------------------------------

def test_rate_limit_429_with_retry_after_then_success(env):
    c = sdk(env, "/limited", key=KEY_A)
    for _ in range(3):
        c.chat.completions.create(max_tokens=1, **CHAT)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(max_tokens=1, **CHAT)
    resp = e.value.response
    retry_after = int(resp.headers["retry-after"])
    assert 1 <= retry_after <= 5
    assert resp.json() == {"statusCode": 429, "message": f"Rate limit is exceeded. Try again in {retry_after} seconds."}
    # Another subscription has its own counter.
    sdk(env, "/limited", key=KEY_B).chat.completions.create(max_tokens=1, **CHAT)
    time.sleep(retry_after)
    assert c.chat.completions.create(max_tokens=1, **CHAT).usage.completion_tokens == 1


def test_quota_403(env):
    c = sdk(env, "/quota", key=KEY_A)
    c.chat.completions.create(max_tokens=1, **CHAT)
    c.chat.completions.create(max_tokens=1, **CHAT)
    with pytest.raises(openai.PermissionDeniedError) as e:
        c.chat.completions.create(max_tokens=1, **CHAT)
    body = e.value.response.json()
    assert body["statusCode"] == 403
    assert re.fullmatch(r"Out of call volume quota\. Quota will be replenished in \d\d:\d\d:\d\d\.", body["message"]), body


# --- token_limit and token metrics -----------------------------------------------------------

def _remaining(raw):
    return int(raw.headers["x-sluice-remaining-tokens"]), int(raw.headers["x-sluice-consumed-tokens"])


def test_tokens_charged_equal_the_simulators_usage(env):
    c = sdk(env, "/tokens", key=KEY_C)
    # A: not streamed; usage from the JSON body.
    raw_a = c.chat.completions.with_raw_response.create(max_tokens=7, **CHAT)
    rem_a, est_a = _remaining(raw_a)
    usage_a = raw_a.parse().usage
    # Reserved up front: the prompt estimate plus the max_tokens allowed.
    assert rem_a == TPM - est_a - 7
    assert est_a == usage_a.prompt_tokens, "the prompt estimate uses the same tokenizer as the backend"
    # B: streamed with include_usage; usage from the stream's last chunk.
    raw_b = c.chat.completions.with_raw_response.create(
        max_tokens=6, stream=True, stream_options={"include_usage": True}, **CHAT
    )
    rem_b, est_b = _remaining(raw_b)
    assert rem_b == TPM - usage_a.total_tokens - est_b - 6, "A was charged its actual usage"
    usage_b = [ch.usage for ch in raw_b.parse() if ch.usage][-1]
    # C: streamed without usage: charged the prompt estimate + the streamed tokens.
    raw_c = c.chat.completions.with_raw_response.create(max_tokens=5, stream=True, **CHAT)
    rem_c, est_c = _remaining(raw_c)
    assert rem_c == TPM - usage_a.total_tokens - usage_b.total_tokens - est_c - 5, "B was charged its actual usage"
    chunks_c = [ch for ch in raw_c.parse() if ch.choices and ch.choices[0].delta.content]
    assert len(chunks_c) == 5
    # D: checks what C was charged.
    raw_d = c.chat.completions.with_raw_response.create(max_tokens=1, **CHAT)
    rem_d, est_d = _remaining(raw_d)
    charged_c = TPM - usage_a.total_tokens - usage_b.total_tokens - est_d - 1 - rem_d
    assert charged_c == est_c + 5
    usage_d = raw_d.parse().usage
    # Metrics on the management listener add up to the same totals.
    text = httpx.get(env["gw"].management + "/metrics", timeout=10).text
    total = sum(
        float(v)
        for labels, v in re.findall(r'^sluice_tokens_total\{([^}]*)\} (\S+)$', text, re.M)
        if 'api="tokens"' in labels and 'subscription="team-c"' in labels
    )
    assert total == usage_a.total_tokens + usage_b.total_tokens + charged_c + usage_d.total_tokens
    assert 'backend_region="West US"' in text and 'deployment="gpt-4o"' in text


def test_large_streamed_requests_are_charged_their_prompt_too(env):
    """A body over 64 KiB is streamed to the backend (not read first): the
    token limit runs on a copy when the body ends, before its last bytes are
    released, so it is reserved its prompt and max_tokens like any other."""
    c = sdk(env, "/big", key=KEY_A)
    big = dict(model="gpt-4o", messages=[{"role": "user", "content": "canal water lock gate " * 6000}])
    raw_a = c.chat.completions.with_raw_response.create(max_tokens=3, stream=True, **big)
    rem_a, est_a = _remaining(raw_a)
    assert est_a > 20000, "estimated before the body was released"
    assert rem_a == 1000000 - est_a - 3
    assert len([ch for ch in raw_a.parse() if ch.choices and ch.choices[0].delta.content]) == 3
    raw_b = c.chat.completions.with_raw_response.create(
        max_tokens=3, stream=True, stream_options={"include_usage": True}, **big
    )
    rem_b, est_b = _remaining(raw_b)
    usage_b = [ch.usage for ch in raw_b.parse() if ch.usage][-1]
    assert usage_b.prompt_tokens == est_b
    # A (a stream without a usage chunk) was charged its prompt estimate
    # plus the streamed tokens.
    charged_a = 1000000 - rem_b - est_b - 3
    assert charged_a == est_a + 3, (charged_a, est_a)


def test_token_limit_429_once_the_minute_is_spent(env):
    c = sdk(env, "/tight", key=KEY_B)
    c.chat.completions.create(max_tokens=40, **CHAT)  # reserves and uses most of the 60 tokens per minute
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(max_tokens=30, **CHAT)
    resp = e.value.response
    secs = int(resp.headers["retry-after"])
    assert 1 <= secs <= 60
    assert resp.json() == {"statusCode": 429, "message": f"Token limit is exceeded. Try again in {secs} seconds."}


def test_token_quota_403_once_the_hour_is_spent(env):
    c = sdk(env, "/token-quota", key=KEY_A)
    c.chat.completions.create(max_tokens=30, **CHAT)  # most of the hourly quota of 50
    with pytest.raises(openai.PermissionDeniedError) as e:
        c.chat.completions.create(max_tokens=20, **CHAT)
    resp = e.value.response
    body = resp.json()
    assert body["statusCode"] == 403
    assert re.fullmatch(r"Token quota is exceeded\. Try again in .*\d+ minutes and \d+ seconds\.", body["message"]), body
    assert 1 <= int(resp.headers["retry-after"]) <= 3600


def test_metrics_for_entra_callers_name_the_app(env):
    sdk(env, "/entra", token=env["entra"].token()).chat.completions.create(max_tokens=2, **CHAT)
    text = httpx.get(env["gw"].management + "/metrics", timeout=10).text
    assert f'identity="app:{FakeEntra.APP_ID}"' in text
    assert httpx.get(env["gw"].management + "/health", timeout=10).status_code == 200


# --- failures of the identity providers ------------------------------------------------------

def test_no_managed_identity_token_gives_503_and_a_log_line_without_secrets(tmp_path):
    """The identity endpoint refuses (wrong header): the gateway answers 503
    and logs the credential type, never the identity header or a key."""
    mi = FakeManagedIdentity(MI_TOKEN)
    (tmp_path / "a.key").write_text(KEY_A)
    (tmp_path / "mi.token").write_text(MI_TOKEN)
    config = """
server: { listen: 127.0.0.1:0, threads: 1 }
simulators: [{name: s, region: East US, api_key: {file: mi.token}}]
backends: [{name: mi, simulator: s, auth: {managed_identity: {}}}]
subscriptions: [{name: team-a, primary_key: {file: a.key}}]
apis: [{name: api, path: /openai, backends: [mi]}]
"""
    wrong_header = "this-is-not-the-identity-header"
    gw = start_gateway(tmp_path, config, env={"IDENTITY_ENDPOINT": mi.endpoint, "IDENTITY_HEADER": wrong_header})
    try:
        with pytest.raises(openai.InternalServerError) as e:
            sdk({"gw": gw}, "", key=KEY_A).chat.completions.create(max_tokens=1, **CHAT)
        assert e.value.status_code == 503
        body = e.value.response.json()
        assert body == {
            "statusCode": 503,
            "message": "Backend authentication failed: could not obtain an Entra ID token for backend 'mi' with managed_identity.",
        }
    finally:
        gw.stop()
        mi.server.stop()
    log = (tmp_path / "sluice.log").read_text()
    assert "managed_identity" in log
    for secret in (wrong_header, KEY_A, MI_TOKEN):
        assert secret not in log


def test_unreachable_signing_keys_give_503(tmp_path):
    entra = FakeEntra()
    (tmp_path / "a.key").write_text(KEY_A)
    (tmp_path / "backend.key").write_text(BACKEND_KEY)
    dead = entra.server.url
    entra.server.stop()
    entra.server.httpd.server_close()
    config = f"""
server: {{ listen: 127.0.0.1:0, threads: 1 }}
simulators: [{{name: s, region: East US, api_key: {{file: backend.key}}}}]
backends: [{{name: s, simulator: s, api_key: {{file: backend.key}}}}]
apis:
  - name: api
    path: /openai
    backends: [s]
    auth: jwt
    policies:
      - validate_jwt: {{jwks_url: {dead}/keys, issuers: [{entra.issuer}], audiences: [{entra.AUDIENCE}]}}
"""
    gw = start_gateway(tmp_path, config)
    try:
        token = entra.token()
        r = httpx.post(
            gw.url + "/openai/deployments/gpt-4o/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": "Bearer " + token},
            timeout=30,
        )
        assert r.status_code == 503
        assert r.json() == {"statusCode": 503, "message": "Unable to validate JWT: signing keys are unavailable."}
        assert token not in (tmp_path / "sluice.log").read_text()
    finally:
        gw.stop()


def test_backends_never_see_the_callers_credentials(tmp_path):
    """Entra ID and key callers, to an api-key backend and to a managed-identity
    backend: each backend gets only its own credential."""
    entra = FakeEntra()
    mi = FakeManagedIdentity(MI_TOKEN)
    keyed, managed = CaptureBackend(), CaptureBackend()
    (tmp_path / "a.key").write_text(KEY_A)
    (tmp_path / "backend.key").write_text(BACKEND_KEY)
    jwt_step = f"""      - validate_jwt:
          openid_config_url: {entra.openid_url}
          issuers: [{entra.issuer}]
          audiences: [{entra.AUDIENCE}]
"""
    config = f"""
server: {{ listen: 127.0.0.1:0, threads: 1 }}
backends:
  - {{name: keyed, url: "{keyed.url}", api_key: {{file: backend.key}}}}
  - {{name: managed, url: "{managed.url}", auth: {{managed_identity: {{}}}}}}
subscriptions: [{{name: team-a, primary_key: {{file: a.key}}}}]
apis:
  - name: to-keyed
    path: /keyed/openai
    backends: [keyed]
    auth: key_or_jwt
    policies:
{jwt_step}  - name: to-managed
    path: /managed/openai
    backends: [managed]
    auth: key_or_jwt
    policies:
{jwt_step}"""
    gw = start_gateway(tmp_path, config, env={"IDENTITY_ENDPOINT": mi.endpoint, "IDENTITY_HEADER": mi.HEADER})
    token = entra.token()
    try:
        for prefix in ("/keyed", "/managed"):
            sdk({"gw": gw}, prefix, token=token).chat.completions.create(max_tokens=1, **CHAT)
            sdk({"gw": gw}, prefix, key=KEY_A).chat.completions.create(max_tokens=1, **CHAT)
            r = httpx.post(
                gw.url + prefix + "/openai/deployments/gpt-4o/chat/completions?subscription-key=" + KEY_A,
                json={"messages": [{"role": "user", "content": "hi"}]},
                headers={"Ocp-Apim-Subscription-Key": KEY_A},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            # The Realtime path takes a browser's key from `api-key=`; it is
            # never forwarded, upgrade or not.
            r = httpx.get(gw.url + prefix + "/openai/v1/realtime?model=rt&api-key=" + KEY_A, timeout=30)
            assert r.status_code == 200, r.text
        # Any other upgrade is refused (it would be an unmetered tunnel).
        r = httpx.get(gw.url + "/keyed/openai/v1/files", timeout=30,
                      headers={"api-key": KEY_A, "connection": "upgrade", "upgrade": "websocket"})
        assert r.status_code == 400 and "Realtime" in r.json()["message"]
    finally:
        gw.stop()
        for s in (entra.server, mi.server, keyed, managed):
            s.stop()
    assert len(keyed.requests) == 4 and len(managed.requests) == 4
    assert any(path.startswith("/openai/v1/realtime?model=rt") for path, _ in keyed.requests)
    for backend, expected in ((keyed, {"api-key": BACKEND_KEY}), (managed, {"authorization": "Bearer " + MI_TOKEN})):
        for path, headers in backend.requests:
            lowered = {k.lower(): v for k, v in headers.items()}
            assert KEY_A not in path, path
            for secret in (token, KEY_A):
                assert all(secret not in v for v in lowered.values()), (path, lowered)
            for name, value in expected.items():
                assert lowered.get(name) == value, lowered
            assert "ocp-apim-subscription-key" not in lowered
            if backend is keyed:
                assert "authorization" not in lowered
            else:
                assert "api-key" not in lowered


def test_a_request_that_could_never_fit_gets_400_not_429(env):
    c = sdk(env, "/tight", key=KEY_A)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(max_tokens=80, **CHAT)  # more than the 60 tokens per minute
    body = e.value.response.json()
    assert body["statusCode"] == 400
    assert re.fullmatch(
        r"Token limit is exceeded: this request may use up to \d+ tokens \(about \d+ in the prompt and up to 80 in the completion\), "
        r"more than the limit of 60 tokens allows\. Waiting will not help: lower max_tokens or shorten the prompt\.",
        body["message"],
    ), body
    # A request that names no maximum is given what fits, not refused.
    assert c.chat.completions.create(**CHAT).choices
