"""Issue 8 (in progress): debug credentials as APIM's listDebugCredentials
hands them out, on the management listener behind an operator token."""

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
    finally:
        gw.stop()
    log = (tmp_path / "sluice.log").read_text()
    assert " DEBUG " in log, "the log is at trace level (debug and below on)"
    for secret in [key, backend_key, OPERATOR, SIGNING, debug_token]:
        assert secret not in log, f"a secret is in the log: {secret[:6]}..."
