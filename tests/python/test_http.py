"""Plain HTTP against Sluice: the wire contract without an SDK."""

import httpx
import pytest

from conftest import KEY

CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture()
def http(gateway):
    with httpx.Client(base_url=gateway, timeout=30) as c:
        yield c


def test_missing_key(http, gateway):
    r = http.post(CHAT, json=BODY)
    assert r.status_code == 401
    assert r.reason_phrase == "Access Denied"
    assert r.text == (
        '{ "statusCode": 401, "message": "Access denied due to missing subscription key. '
        'Make sure to include subscription key when making requests to an API." }'
    )
    host = gateway.removeprefix("http://")
    assert r.headers["www-authenticate"] == (
        f'AzureApiManagementKey realm="http://{host}/openai",name="api-key",type="header"'
    )


def test_invalid_key(http):
    r = http.post(CHAT, json=BODY, headers={"api-key": "nope"})
    assert r.status_code == 401
    assert r.json() == {
        "statusCode": 401,
        "message": "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription.",
    }


def test_query_string_key(http):
    r = http.post(CHAT + "&subscription-key=" + KEY, json=BODY)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_ocp_apim_subscription_key_header(http):
    r = http.post(CHAT, json=BODY, headers={"Ocp-Apim-Subscription-Key": KEY})
    assert r.status_code == 200


@pytest.mark.parametrize(
    "extra,want",
    [
        ({"stream": True}, "True"),
        ({"stream": False}, "False"),
        ({}, "False"),
        ({"stream": "true"}, "True"),
        # The key is matched exactly, as APIM's JObject and Azure read it: the
        # backend answers JSON, and the tag says so.
        ({"Stream": True}, "False"),
    ],
)
def test_x_ms_stream(http, extra, want):
    r = http.post(CHAT, json={**BODY, **extra}, headers={"api-key": KEY})
    # A string "true" is tagged True as APIM does, though Azure (and the
    # simulator) then reject it with 400: backend errors are tagged too.
    assert r.status_code == (400 if extra.get("stream") == "true" else 200), r.text
    assert r.headers["x-ms-stream"] == want
    if extra.get("Stream"):
        assert r.headers["content-type"].startswith("application/json")


def test_stream_over_plain_http(http):
    with http.stream("POST", CHAT, json={**BODY, "stream": True}, headers={"api-key": KEY}) as r:
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        events = [l for l in r.iter_lines() if l.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"choices":[]' in events[0]


def test_unknown_path_404(http):
    r = http.get("/nothing-here", headers={"api-key": KEY})
    assert r.status_code == 404
    assert r.json() == {"statusCode": 404, "message": "Resource not found"}


def test_curl_style_request_with_backend_headers(http):
    r = http.post(CHAT, json=BODY, headers={"api-key": KEY, "x-ms-client-request-id": "abc-123"})
    assert r.status_code == 200
    assert r.headers["x-ms-region"] == "East US"
    assert r.headers.get("x-ratelimit-remaining-tokens")
    assert r.headers.get("x-ms-client-request-id") == "abc-123"
