"""Issue 9, first step: the plain `OpenAI(base_url=<sluice>/openai/v1/)`
client sends its key as `Authorization: Bearer <key>`; on v1 paths Sluice
takes that as the subscription key (the deployments form keeps `api-key`)."""

import httpx
import openai
import pytest

from conftest import KEY


def client(gateway, key=KEY):
    return openai.OpenAI(base_url=f"{gateway}/openai/v1/", api_key=key, max_retries=0)


def test_chat_embeddings_and_a_stream_with_the_plain_client(gateway):
    c = client(gateway)
    r = c.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hello"}], max_tokens=5)
    assert r.headers["x-ms-region"] == "East US" and r.headers["x-ms-stream"] == "False"
    assert r.parse().choices[0].message.content
    e = c.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert len(e.data) == 2 and e.data[0].embedding
    chunks = list(c.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def test_a_wrong_bearer_key_is_refused_like_a_wrong_api_key(gateway):
    with pytest.raises(openai.AuthenticationError) as e:
        client(gateway, key="not-a-key-0000").chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hello"}])
    assert "invalid subscription key" in str(e.value)


def test_the_deployments_form_still_wants_api_key(gateway):
    url = f"{gateway}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    body = {"messages": [{"role": "user", "content": "Hello"}]}
    r = httpx.post(url, json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 401 and "missing subscription key" in r.json()["message"]
    r = httpx.post(url, json=body, headers={"api-key": KEY}, timeout=30)
    assert r.status_code == 200
