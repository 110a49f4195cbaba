"""Issue 6 end to end: no secret at any log level, bounded client-driven
state (counter cap, metric labels, trusted proxies), and token limits that
hold under concurrency. Each test starts its own gateway (the sluice binary
as a child process) so that its log and counters are its own."""

import concurrent.futures
import re

import httpx
import pytest
from openai import AzureOpenAI

from conftest import start_gateway
from fakes import FakeEntra, FakeManagedIdentity

API_VERSION = "2024-10-21"
KEY = "hardening-team-a-key-0123456789"
KEY2 = "hardening-team-a-secondary-key-9876"
OTHER_KEY = "hardening-invalid-key-not-configured"
BACKEND_KEY = "hardening-backend-api-key-abcdef"
MI_TOKEN = "hardening-managed-identity-token-xyz"
CHAT = f"/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}"


def write_keys(d):
    for name, value in [("a.key", KEY), ("a2.key", KEY2), ("backend.key", BACKEND_KEY), ("mi.token", MI_TOKEN)]:
        (d / name).write_text(value)


def keyed_config(policies: str, server: str = "", sim: str = "") -> str:
    """One simulated region behind one API at /openai, for subscription team-a."""
    return f"""
server:
  listen: 127.0.0.1:0
  threads: 2
{server}
simulators:
  - name: keyed
    region: East US
    api_key: {{file: backend.key}}
{sim}
backends:
  - name: keyed
    simulator: keyed
    api_key: {{file: backend.key}}
subscriptions:
  - name: team-a
    primary_key: {{file: a.key}}
apis:
  - name: keyed
    path: /openai
    backends: [keyed]
    policies:
{policies}
"""


def chat_body(**extra):
    return {"messages": [{"role": "user", "content": "Hello there"}], **extra}


def metrics_text(gw) -> str:
    return httpx.get(f"{gw.management}/metrics", timeout=10).text


def test_no_secret_reaches_the_log_at_trace_level(tmp_path):
    entra = FakeEntra()
    mi = FakeManagedIdentity(MI_TOKEN)
    write_keys(tmp_path)
    config = f"""
server:
  listen: 127.0.0.1:0
  threads: 2
  management:
    listen: 127.0.0.1:0
simulators:
  - name: keyed
    region: East US
    api_key: {{file: backend.key}}
  - name: entra-only
    region: West US
    api_key: {{file: mi.token}}
backends:
  - name: keyed
    simulator: keyed
    api_key: {{file: backend.key}}
  - name: mi
    simulator: entra-only
    auth:
      managed_identity: {{}}
subscriptions:
  - name: team-a
    primary_key: {{file: a.key}}
    secondary_key: {{file: a2.key}}
apis:
  - name: keyed
    path: /openai
    backends: [keyed]
    policies:
      - token_limit: {{counter_key: subscription, tokens_per_minute: 1000000}}
      - emit_token_metric: {{dimensions: [subscription, api, identity, client_ip]}}
  - name: entra
    path: /entra/openai
    backends: [mi]
    auth: key_or_jwt
    policies:
      - validate_jwt:
          openid_config_url: {entra.openid_url}
          issuers: [{entra.issuer}]
          audiences: [{entra.AUDIENCE}]
      - emit_token_metric: {{dimensions: [api, identity]}}
"""
    env = {
        "RUST_LOG": "trace",
        "IDENTITY_ENDPOINT": mi.endpoint,
        "IDENTITY_HEADER": FakeManagedIdentity.HEADER,
    }
    gw = start_gateway(tmp_path, config, env=env)
    good_jwt = entra.token()
    bad_jwt = entra.token(key=entra.other_key)
    expired_jwt = entra.token(exp_in=-3600)
    try:
        client = AzureOpenAI(azure_endpoint=gw.url, api_key=KEY, api_version=API_VERSION, max_retries=0)
        r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert r.usage.total_tokens > 0
        chunks = list(client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True}))
        assert chunks
        with httpx.Client(base_url=gw.url, timeout=30) as h:
            body = chat_body()
            assert h.post(CHAT, json=body, headers={"Ocp-Apim-Subscription-Key": KEY2}).status_code == 200
            assert h.post(f"{CHAT}&subscription-key={KEY}", json=body).status_code == 200
            assert h.post(CHAT, json=body, headers={"api-key": OTHER_KEY}).status_code == 401
            assert h.post(f"{CHAT}&subscription-key={OTHER_KEY}", json=body).status_code == 401
            entra_chat = "/entra" + CHAT
            # A JWT caller reaches the managed-identity backend.
            r = h.post(entra_chat, json=body, headers={"Authorization": f"Bearer {good_jwt}"})
            assert r.status_code == 200, r.text
            # ... a key caller too, and refused tokens are refused.
            assert h.post(entra_chat, json=body, headers={"api-key": KEY}).status_code == 200
            for t in (bad_jwt, expired_jwt):
                r = h.post(entra_chat, json=body, headers={"Authorization": f"Bearer {t}"})
                assert r.status_code == 401
                assert t not in r.text
        assert mi.fetches() >= 1
        metrics = metrics_text(gw)
    finally:
        gw.stop()
    log = (tmp_path / "sluice.log").read_text()
    # The log is really verbose: every request's access line is there, and
    # the libraries' debug detail.
    assert log.count("sluice::access") >= 8, log[:3000]
    assert "DEBUG" in log and "azure_identity" in log, log[:3000]
    secrets = {
        "subscription key": KEY,
        "secondary key": KEY2,
        "invalid caller key": OTHER_KEY,
        "backend api-key": BACKEND_KEY,
        "managed identity token": MI_TOKEN,
        "caller JWT": good_jwt,
        "caller JWT signature": good_jwt.rsplit(".", 1)[1],
        "refused JWT": bad_jwt.rsplit(".", 1)[1],
        "expired JWT": expired_jwt.rsplit(".", 1)[1],
        "identity header": FakeManagedIdentity.HEADER,
    }
    for what, value in secrets.items():
        assert value not in log, f"the {what} is in the log"
        assert value not in metrics, f"the {what} is in /metrics"


def test_token_limit_holds_under_concurrency(tmp_path):
    write_keys(tmp_path)
    limit, max_tokens = 2000, 100
    config = keyed_config(
        f"      - token_limit: {{counter_key: subscription, tokens_per_minute: {limit}}}",
        sim="    time_to_first_token_ms: 200",
    )
    gw = start_gateway(tmp_path, config)
    try:
        body = chat_body(max_tokens=max_tokens)

        def call(_):
            with httpx.Client(base_url=gw.url, timeout=30) as h:
                return h.post(CHAT, json=body, headers={"api-key": KEY})

        with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
            responses = list(pool.map(call, range(50)))
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 429]
        assert len(ok) + len(refused) == 50, [r.status_code for r in responses]
        assert ok and refused
        used = sum(r.json()["usage"]["total_tokens"] for r in ok)
        one_request = max(r.json()["usage"]["total_tokens"] for r in ok)
        # The simulator writes max_tokens tokens: every admitted call used
        # what it reserved, and together they stay within the limit.
        assert all(r.json()["usage"]["completion_tokens"] == max_tokens for r in ok)
        assert used <= limit + one_request, (used, len(ok))
        for r in refused:
            assert r.json()["statusCode"] == 429
            secs = int(r.headers["Retry-After"])
            assert 1 <= secs <= 60
            assert r.json()["message"] == f"Token limit is exceeded. Try again in {secs} seconds."
        # A request that could never fit is told so, and not with a 429.
        r = httpx.post(gw.url + CHAT, json=chat_body(max_tokens=limit + 1), headers={"api-key": KEY}, timeout=30)
        assert r.status_code == 400, r.text
        assert "Waiting will not help" in r.json()["message"]
    finally:
        gw.stop()


def test_client_state_is_bounded(tmp_path):
    """A small counter cap drops the least recently used counter (and counts
    it); a client-driven metric label keeps a bounded set of values."""
    write_keys(tmp_path)
    config = keyed_config(
        "      - rate_limit: {calls: 1, renewal_period_seconds: 300, counter_key: 'header:x-team'}\n"
        "      - emit_token_metric: {dimensions: [api, 'header:x-team']}",
        server="  counters: { max_keys: 3 }\n  management:\n    listen: 127.0.0.1:0\n    max_label_values: 2",
    )
    gw = start_gateway(tmp_path, config)
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as h:
            def team(name):
                return h.post(CHAT, json=chat_body(max_tokens=2), headers={"api-key": KEY, "x-team": name}).status_code

            assert [team(t) for t in ("red", "blue", "green")] == [200, 200, 200]
            assert team("red") == 429  # its counter is live
            assert team("white") == 200  # a fourth key: the least recently used (blue) goes
            assert team("red") == 429  # red was used more recently than blue, and is kept
            assert team("blue") == 200  # blue starts afresh
            text = metrics_text(gw)
        m = re.search(r"^sluice_counter_evictions_total (\d+)", text, re.M)
        assert m and int(m.group(1)) >= 2, text
        labels = set(re.findall(r'sluice_tokens_total\{api="keyed",header_x_team="([^"]+)"\}', text))
        assert labels == {"red", "blue", "other"}, text
    finally:
        gw.stop()


@pytest.mark.parametrize("trusted", [True, False])
def test_x_forwarded_for_is_believed_only_from_trusted_proxies(tmp_path, trusted):
    write_keys(tmp_path)
    proxies = "trusted_proxies: [127.0.0.1]" if trusted else ""
    config = keyed_config(
        "      - rate_limit: {calls: 1, renewal_period_seconds: 300, counter_key: client_ip}",
        server=f"  {proxies}",
    )
    gw = start_gateway(tmp_path, config)
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as h:
            def from_(xff):
                return h.post(CHAT, json=chat_body(max_tokens=2), headers={"api-key": KEY, "X-Forwarded-For": xff}).status_code

            first = from_("203.0.113.7")
            second = from_("203.0.113.8")
            # Behind a trusted proxy, the right-most untrusted hop is the client.
            third = from_("203.0.113.8, 127.0.0.1")
        if trusted:
            assert (first, second, third) == (200, 200, 429)
        else:
            # The peer (127.0.0.1) is the client whatever the header says.
            assert (first, second, third) == (200, 429, 429)
    finally:
        gw.stop()
