"""Issue 9: the v1 API and the Responses API through Sluice, with real clients.

- the plain `OpenAI(base_url=<sluice>/openai/v1/)` client with a subscription
  key: chat, embeddings, Responses (streamed and not), with token limits and
  metrics checked for each;
- the deployment read from the body's `model` (pool choice, per-backend
  rename), the models list answered from the configuration;
- affinity: `previous_response_id` chains across three regions, a file
  uploaded then read back, ids the gateway never saw found by asking, and a
  pinned call never moved on failure;
- `AzureOpenAI`'s Responses call and LangChain's `AzureChatOpenAI` on the
  Responses API;
- usage asked of streams that did not ask for it, and the extra chunk kept
  from the client.
"""

import re

import httpx
import openai
import pytest
from openai import AzureOpenAI, OpenAI

from conftest import start_gateway

KEY = "v1-team-key"
OTHER = "v1-other-key"
BACKEND_KEY = "v1-backend-key"
OPERATOR = "v1-operator-token"
TPM = 1_000_000
API_VERSION = "2025-04-01-preview"

CONFIG = f"""
server:
  listen: 127.0.0.1:0
  threads: 2
  management:
    listen: 127.0.0.1:0
    operator_tokens: [{{file: operator.token}}]
simulators:
  - name: eastus
    region: East US
    api_key: {{file: backend.key}}
    per_token_ms: 1
  - name: westus
    region: West US
    api_key: {{file: backend.key}}
    per_token_ms: 1
    deployments:
      gpt-4o-west: {{model: gpt-4o-as-named-in-west}}
  - name: sweden
    region: Sweden Central
    api_key: {{file: backend.key}}
    per_token_ms: 1
backends:
  - name: eastus
    simulator: eastus
    api_key: {{file: backend.key}}
  - name: westus
    simulator: westus
    api_key: {{file: backend.key}}
    deployments: {{gpt-4o: gpt-4o-west}}
  - name: sweden
    simulator: sweden
    api_key: {{file: backend.key}}
pools:
  - name: three
    backends:
      - {{backend: eastus}}
      - {{backend: westus}}
      - {{backend: sweden}}
  - name: west-only
    backends: [{{backend: westus}}]
  - name: sweden-only
    backends: [{{backend: sweden}}]
subscriptions:
  - name: team-v1
    primary_key: {{file: key}}
  - name: team-other
    primary_key: {{file: other.key}}
apis:
  - name: v1
    path: /openai
    pool: three
    deployment_pools:
      text-embedding-3-small: sweden-only
      gpt-4o-mini: west-only
    models: [gpt-4o, gpt-4o-mini, text-embedding-3-small]
    policies:
      - token_limit:
          counter_key: subscription
          tokens_per_minute: {TPM}
          remaining_tokens_header_name: x-sluice-remaining-tokens
          tokens_consumed_header_name: x-sluice-consumed-tokens
      - emit_token_metric:
          dimensions: [subscription, api, deployment, backend_region]
  - name: plain
    path: /plain/openai
    backends: [eastus, westus, sweden]
  - name: east
    path: /east/openai
    backends: [eastus]
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    d = tmp_path_factory.mktemp("v1")
    (d / "key").write_text(KEY)
    (d / "other.key").write_text(OTHER)
    (d / "backend.key").write_text(BACKEND_KEY)
    (d / "operator.token").write_text(OPERATOR)
    g = start_gateway(d, CONFIG)
    yield g
    g.stop()


def v1(gw, prefix="/openai", key=KEY):
    return OpenAI(base_url=f"{gw.url}{prefix}/v1/", api_key=key, max_retries=0)


def azure(gw, prefix="/openai", key=KEY):
    # The SDK adds `/openai` itself.
    return AzureOpenAI(azure_endpoint=gw.url + prefix.removesuffix("/openai"), api_key=key, api_version=API_VERSION, max_retries=0)


def metric_sum(gw, name, **labels):
    text = httpx.get(gw.management + "/metrics", timeout=10).text
    total = 0.0
    for found, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        if all(f'{k}="{v}"' in found for k, v in labels.items()):
            total += float(value)
    return total


def consumed(raw):
    return int(raw.headers["x-sluice-consumed-tokens"])


def remaining(raw):
    return int(raw.headers["x-sluice-remaining-tokens"])


MSG = [{"role": "user", "content": "Tell me about canal locks"}]


# --- the plain v1 client: chat, embeddings, Responses, with limits and metrics -----------------


def test_plain_client_chat_embeddings_and_responses_are_charged_and_measured(gw):
    c = v1(gw)
    before = metric_sum(gw, "sluice_tokens_total", subscription="team-v1")
    charged = 0

    # Chat, not streamed: usage from the body.
    r = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG, max_tokens=5)
    chat = r.parse()
    assert chat.choices[0].message.content and chat.usage.total_tokens > 0
    charged += chat.usage.total_tokens

    # Chat streamed without include_usage: Sluice asks the backend for it,
    # charges it, and keeps the extra chunk from the client.
    r = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG, max_tokens=4, stream=True)
    chunks = list(r.parse())
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert all(ch.usage is None for ch in chunks), "the usage chunk Sluice asked for reached the client"
    assert all(ch.choices for ch in chunks[1:]), "an empty-choices chunk after the first reached the client"

    # Chat streamed with include_usage: the client gets its chunk.
    r = c.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSG, max_tokens=4, stream=True, stream_options={"include_usage": True})
    usage3 = [ch.usage for ch in r.parse() if ch.usage]
    assert len(usage3) == 1 and usage3[0].completion_tokens == 4
    # The stream before it was charged what the backend reported: the
    # same prompt and 4 completion tokens.
    charged += 2 * usage3[0].total_tokens

    # Embeddings (routed to Sweden by deployment_pools, read from `model`).
    r = c.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["one", "two"])
    assert r.headers["x-ms-region"] == "Sweden Central"
    e = r.parse()
    assert len(e.data) == 2
    charged += e.usage.total_tokens

    # Responses, not streamed.
    r = c.responses.with_raw_response.create(model="gpt-4o", input="Describe a lock gate", max_output_tokens=6)
    resp = r.parse()
    assert resp.id.startswith("resp_") and resp.output_text
    assert resp.usage.input_tokens > 0 and resp.usage.output_tokens > 0
    assert consumed(r) > 0
    charged += resp.usage.total_tokens

    # Responses, streamed: usage from response.completed.
    events = list(c.responses.create(model="gpt-4o", input="Describe a weir", stream=True, max_output_tokens=5))
    kinds = [ev.type for ev in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert any(k == "response.output_text.delta" for k in kinds)
    done = events[-1].response
    charged += done.usage.total_tokens

    # Everything charged what the backends reported: the counters and the
    # metric agree.
    r = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG, max_tokens=1)
    last = r.parse().usage.total_tokens
    total = metric_sum(gw, "sluice_tokens_total", subscription="team-v1") - before
    assert total == charged + last, (total, charged + last)
    assert metric_sum(gw, "sluice_tokens_total", subscription="team-v1", deployment="text-embedding-3-small") > 0
    assert metric_sum(gw, "sluice_tokens_total", subscription="team-v1", deployment="gpt-4o") > 0


def test_the_token_window_is_charged_reported_usage(gw):
    """The counter itself (remaining tokens) moves by what the backend reported."""
    c = v1(gw, key=OTHER)
    r1 = c.responses.with_raw_response.create(model="gpt-4o", input="One", max_output_tokens=3)
    u1 = r1.parse().usage.total_tokens
    r2 = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG, max_tokens=3, stream=True)
    list(r2.parse())
    r3 = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG, max_tokens=3,
                                                     stream=True, stream_options={"include_usage": True})
    u3 = [ch.usage for ch in r3.parse() if ch.usage][0].total_tokens
    r4 = c.responses.with_raw_response.create(model="gpt-4o", input="Two", max_output_tokens=2)
    # Before r4 the window held u1, r2 (same prompt and length as r3: u3)
    # and u3; r4 itself reserved its prompt (the consumed header) and its
    # max_output_tokens.
    assert remaining(r4) == TPM - u1 - u3 - u3 - consumed(r4) - 2


def test_models_list_comes_from_the_configuration(gw):
    c = v1(gw)
    names = [m.id for m in c.models.list()]
    assert names == ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
    assert c.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")
    r = httpx.get(f"{gw.url}/openai/models?api-version={API_VERSION}", headers={"api-key": KEY}, timeout=10)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == names
    # Without a key: 401 like any other call.
    r = httpx.get(f"{gw.url}/openai/v1/models", timeout=10)
    assert r.status_code == 401
    # An API without `models:` lists what its configuration routes: here
    # West's rename.
    r = httpx.get(f"{gw.url}/plain/openai/v1/models", headers={"api-key": KEY}, timeout=10)
    assert [m["id"] for m in r.json()["data"]] == ["gpt-4o", "gpt-4o-west"]


def test_model_picks_the_pool_and_is_renamed_per_backend(gw):
    c = v1(gw)
    # gpt-4o-mini: deployment_pools sends it to West only.
    r = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSG, max_tokens=2)
    assert r.headers["x-ms-region"] == "West US"
    # gpt-4o over three regions: West knows it as gpt-4o-west (its
    # simulator reports that deployment's model name), the others as sent.
    seen = {}
    for _ in range(6):
        r = c.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG, max_tokens=2)
        seen[r.headers["x-ms-region"]] = r.parse().model
    assert seen["West US"] == "gpt-4o-as-named-in-west"
    assert seen["East US"] == "gpt-4o" and seen["Sweden Central"] == "gpt-4o"
    # The same for a stream and for Responses.
    for _ in range(3):
        r = c.responses.with_raw_response.create(model="gpt-4o", input="x", max_output_tokens=2)
        if r.headers["x-ms-region"] == "West US":
            assert r.parse().model == "gpt-4o-as-named-in-west"


# --- affinity ---------------------------------------------------------------------------------


def test_previous_response_id_chains_stay_on_their_region_across_three_regions(gw):
    c = v1(gw)
    chains = {}
    for _ in range(3):
        r = c.responses.with_raw_response.create(model="gpt-4o", input="Start", max_output_tokens=2)
        chains[r.headers["x-ms-region"]] = r.parse().id
    assert len(chains) == 3, "round robin spreads the first calls over the three regions"
    for region, first in chains.items():
        prev = first
        for turn in range(3):
            if turn == 1:
                events = list(c.responses.create(model="gpt-4o", input="More", previous_response_id=prev,
                                                 stream=True, max_output_tokens=2))
                done = events[-1].response
                assert done.previous_response_id == prev
                prev = done.id
                continue
            r = c.responses.with_raw_response.create(model="gpt-4o", input="More", previous_response_id=prev,
                                                     max_output_tokens=2)
            assert r.headers["x-ms-region"] == region
            prev = r.parse().id
        # Reading and deleting go to the owner too.
        got = c.responses.with_raw_response.retrieve(prev)
        assert got.headers["x-ms-region"] == region and got.parse().id == prev
        items = c.responses.input_items.list(prev)
        assert items.data
        c.responses.delete(prev)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(prev)
    assert metric_sum(gw, "sluice_affinity_total", result="pinned") >= 9


def test_a_file_uploaded_is_read_back_and_batched_on_its_region(gw):
    c = v1(gw)
    content = b'{"custom_id":"1","method":"POST","url":"/v1/chat/completions","body":{"model":"gpt-4o"}}\n'
    regions = set()
    for _ in range(3):
        f = c.files.with_raw_response.create(file=("batch.jsonl", content), purpose="batch")
        region = f.headers["x-ms-region"]
        regions.add(region)
        fid = f.parse().id
        got = c.files.with_raw_response.retrieve(fid)
        assert got.headers["x-ms-region"] == region and got.parse().bytes == len(content)
        assert c.files.content(fid).content == content
        b = c.batches.with_raw_response.create(input_file_id=fid, endpoint="/v1/chat/completions",
                                               completion_window="24h")
        assert b.headers["x-ms-region"] == region
        bid = b.parse().id
        assert c.batches.retrieve(bid).input_file_id == fid
        assert c.batches.cancel(bid).status in ("cancelling", "cancelled")
        c.files.delete(fid)
    assert len(regions) == 3


def test_an_id_the_gateway_never_saw_is_found_by_asking(gw):
    # Created on West directly (as if before a restart), then read through Sluice.
    sim = gw.simulators["westus"]
    r = httpx.post(f"{sim}/openai/v1/responses", json={"model": "gpt-4o", "input": "hi"},
                   headers={"api-key": BACKEND_KEY}, timeout=10)
    rid = r.json()["id"]
    c = v1(gw)
    before = metric_sum(gw, "sluice_affinity_total", result="found")
    got = c.responses.with_raw_response.retrieve(rid)
    assert got.headers["x-ms-region"] == "West US" and got.parse().id == rid
    assert metric_sum(gw, "sluice_affinity_total", result="found") == before + 1
    # Now it is known: a follow-up goes straight there.
    f = c.responses.with_raw_response.create(model="gpt-4o", input="on", previous_response_id=rid)
    assert f.headers["x-ms-region"] == "West US"
    # An id no backend has: every backend is asked once, then the 404.
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve("resp_" + "0" * 32)


def test_an_unknown_previous_response_id_is_sought_through_400s(gw):
    # The service answers an unknown previous_response_id with a 400: each
    # backend that says so is passed by until the owner answers.
    sim = gw.simulators["sweden"]
    r = httpx.post(f"{sim}/openai/v1/responses", json={"model": "gpt-4o", "input": "hi"},
                   headers={"api-key": BACKEND_KEY}, timeout=10)
    rid = r.json()["id"]
    c = v1(gw)
    before = metric_sum(gw, "sluice_affinity_total", result="found")
    for _ in range(3):  # whichever backend the pool offers first
        f = c.responses.with_raw_response.create(model="gpt-4o", input="on", previous_response_id=rid)
        assert f.headers["x-ms-region"] == "Sweden Central"
    assert metric_sum(gw, "sluice_affinity_total", result="found") == before + 1, "found once, then pinned"
    # A previous_response_id nobody has: the client gets the last 400.
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="gpt-4o", input="x", previous_response_id="resp_" + "1" * 32)
    assert "previous_response_not_found" in str(e.value)


def test_an_id_never_opens_another_apis_backends(gw):
    c = v1(gw)
    for _ in range(3):
        r = c.responses.with_raw_response.create(model="gpt-4o", input="x", max_output_tokens=2)
        if r.headers["x-ms-region"] == "West US":
            break
    assert r.headers["x-ms-region"] == "West US"
    rid = r.parse().id
    # The /east API reaches only East: the id, known to be West's, is
    # sought there and not found, rather than opened on West.
    east = v1(gw, prefix="/east/openai")
    with pytest.raises(openai.NotFoundError) as e:
        east.responses.retrieve(rid)
    assert e.value.response.headers["x-ms-region"] == "East US"
    # Through its own API it is still West's.
    assert c.responses.with_raw_response.retrieve(rid).headers["x-ms-region"] == "West US"


def test_a_pinned_call_is_never_moved_elsewhere(gw):
    c = v1(gw)
    r = c.responses.with_raw_response.create(model="gpt-4o", input="Start", max_output_tokens=2)
    region, rid = r.headers["x-ms-region"], r.parse().id
    # Its owner fails: the client gets that failure, not another region's
    # "previous response not found".
    sim = {"East US": "eastus", "West US": "westus", "Sweden Central": "sweden"}[region]
    fault = {"x-sim-fault": "status=500", "x-sim-fault-region": sim}
    with pytest.raises(openai.InternalServerError):
        c.responses.create(model="gpt-4o", input="next", previous_response_id=rid, extra_headers=fault)
    ok = c.responses.with_raw_response.create(model="gpt-4o", input="next", previous_response_id=rid)
    assert ok.headers["x-ms-region"] == region


# --- other clients ----------------------------------------------------------------------------


def test_azure_openai_responses_call(gw):
    c = azure(gw)
    r = c.responses.with_raw_response.create(model="gpt-4o", input="Hello", max_output_tokens=4)
    assert r.headers["x-ms-stream"] == "False"
    resp = r.parse()
    assert resp.output_text and consumed(r) > 0
    events = list(c.responses.create(model="gpt-4o", input="Hello", stream=True, previous_response_id=resp.id))
    assert events[-1].type == "response.completed"
    assert events[-1].response.previous_response_id == resp.id


def test_langchain_azure_chat_openai_on_the_responses_api(gw):
    from langchain_openai import AzureChatOpenAI

    llm = AzureChatOpenAI(azure_endpoint=gw.url, api_key=KEY, api_version=API_VERSION,
                          azure_deployment="gpt-4o", use_responses_api=True, max_retries=0)
    before = metric_sum(gw, "sluice_tokens_total", subscription="team-v1")
    msg = llm.invoke("Say hello")
    assert msg.text if isinstance(msg.text, str) else msg.text()
    assert msg.usage_metadata and msg.usage_metadata["total_tokens"] > 0
    streamed = list(llm.stream("Say hello again"))
    assert streamed
    assert metric_sum(gw, "sluice_tokens_total", subscription="team-v1") > before


# --- in-stream failures and other paths -------------------------------------------------------


@pytest.mark.parametrize("how", ["response.failed", "error"])
def test_failures_inside_a_responses_stream_are_counted(gw, how):
    c = v1(gw)
    before = metric_sum(gw, "sluice_stream_failures_total")
    seen = []
    try:
        for ev in c.responses.create(model="gpt-4o", input="x", stream=True,
                                     extra_headers={"x-sim-stream-fail": how}):
            seen.append(ev.type)
    except openai.APIError:
        pass  # the SDK raises on an `error` event
    assert metric_sum(gw, "sluice_stream_failures_total") == before + 1
    assert "response.completed" not in seen


def test_other_openai_paths_reach_the_backend(gw):
    # A path Sluice has no special handling for goes to the backend with
    # the API's auth: the answer is the backend's, not the gateway's 404.
    r = httpx.post(f"{gw.url}/openai/v1/vector_stores", json={"name": "x"}, headers={"api-key": KEY}, timeout=10)
    assert "statusCode" not in r.text, r.text
    assert r.headers.get("x-ms-region")
    r = httpx.post(f"{gw.url}/openai/v1/vector_stores", json={"name": "x"}, timeout=10)
    assert r.status_code == 401


def test_traces_record_the_affinity_and_the_stream_failure(gw):
    prefix = "/subscriptions/s/resourceGroups/r/providers/Microsoft.ApiManagement/service/sluice"
    op = {"authorization": f"Bearer {OPERATOR}"}
    r = httpx.post(f"{gw.management}{prefix}/gateways/managed/listDebugCredentials?api-version=2023-05-01-preview",
                   headers=op, timeout=10,
                   json={"credentialsExpireAfter": "PT1H", "apiId": f"{prefix}/apis/v1", "purposes": ["tracing"]})
    assert r.status_code == 200, r.text
    debug = {"Apim-Debug-Authorization": r.json()["token"]}
    c = v1(gw)
    first = c.responses.create(model="gpt-4o", input="Start", max_output_tokens=2)
    raw = c.responses.with_raw_response.create(
        model="gpt-4o", input="x", stream=True, previous_response_id=first.id,
        extra_headers={**debug, "x-sim-stream-fail": "response.failed"})
    list(raw.parse())
    trace = httpx.post(f"{gw.management}{prefix}/gateways/managed/listTrace?api-version=2024-06-01-preview",
                       headers=op, json={"traceId": raw.headers["apim-trace-id"]}, timeout=15).json()
    inbound = {e["source"]: e["data"] for e in trace["traceEntries"]["inbound"]}
    assert "goes there, with no failover" in inbound["affinity"]["message"]
    assert inbound["affinity"]["backend"] in ("eastus", "westus", "sweden")
    outbound = {e["source"]: e["data"] for e in trace["traceEntries"]["outbound"]}
    assert outbound["stream-failure"]["kind"] == "failed"
    assert outbound["stream-failure"]["code"] == "server_error"
