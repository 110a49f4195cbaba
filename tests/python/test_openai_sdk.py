"""The real openai SDK (AzureOpenAI) through Sluice."""

import base64
import struct

import openai
import pytest
from openai import AzureOpenAI, OpenAI

from conftest import KEY, KEY2

API_VERSION = "2024-10-21"


def client(url, key=KEY, prefix=""):
    return AzureOpenAI(azure_endpoint=url + prefix, api_key=key, api_version=API_VERSION, max_retries=0)


def test_chat_completion(gateway):
    c = client(gateway)
    r = c.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say hello"}], max_tokens=5
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_chat_with_raw_response_headers(gateway):
    raw = client(gateway, key=KEY2).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.status_code == 200
    assert raw.headers["x-ms-stream"] == "False"
    assert raw.headers["x-ms-region"] == "East US"
    assert raw.headers.get("apim-request-id")
    assert raw.parse().usage.prompt_tokens > 0


def test_streaming_with_raw_response(gateway):
    c = client(gateway, prefix="/slow")
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-ms-stream"] == "True"
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-ms-region"] == "Sweden Central"
    kinds, text, usage = [], [], None
    for chunk in raw.parse():
        if not chunk.choices:
            kinds.append("usage" if chunk.usage else "prompt_filter")
        elif chunk.choices[0].finish_reason:
            kinds.append("finish")
        elif chunk.choices[0].delta.content:
            kinds.append("text")
        else:
            kinds.append("role")
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert len(text) == 8
    assert usage is not None and usage.completion_tokens == 8
    # Every event arrives, one chunk each, in Azure's order. (That events are
    # relayed as they come rather than buffered is proven without timing in
    # crates/sluice/tests/promises.rs.)
    assert kinds == ["prompt_filter", "role"] + ["text"] * 8 + ["finish", "usage"], kinds


def test_streaming_without_usage_has_no_usage_chunk(gateway):
    stream = client(gateway).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    )
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


def test_embeddings(gateway):
    r = client(gateway).embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert len(r.data) == 2
    assert len(r.data[0].embedding) > 0
    assert r.usage.prompt_tokens > 0
    # The SDK asked for base64 and decoded it; check the floats are sane.
    assert all(isinstance(x, float) for x in r.data[1].embedding[:5])


def test_legacy_completions(gateway):
    c = client(gateway)
    r = c.completions.create(model="gpt-35-turbo-instruct", prompt="Once upon a time", max_tokens=4)
    assert r.choices[0].text
    assert r.usage.completion_tokens == 4
    s = c.completions.create(model="gpt-35-turbo-instruct", prompt="Hi", max_tokens=3, stream=True)
    assert "".join(ch.choices[0].text for ch in s if ch.choices).strip()


def test_v1_api_with_openai_client(gateway):
    c = OpenAI(
        base_url=gateway + "/openai/v1/",
        api_key="ignored-by-sluice",
        default_headers={"api-key": KEY},
        max_retries=0,
    )
    r = c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert r.usage.total_tokens > 0


def test_wrong_key_raises_authentication_error(gateway):
    with pytest.raises(openai.AuthenticationError) as e:
        client(gateway, key="not-a-key").chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.status_code == 401
    assert e.value.body == {
        "statusCode": 401,
        "message": "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription.",
    }
