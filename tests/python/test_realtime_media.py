"""Issue 10: Realtime over WebSocket, multipart uploads and binary answers
through Sluice, with real clients.

- Realtime: the SDK's Realtime client (plain `OpenAI` on v1, `AzureOpenAI` on
  the api-version form) and the `websockets` package: handshake (header key,
  browser `api-key=` query, bearer), one response with its usage charged and
  measured, a wrong key refused like any call, failover before the upgrade,
  a clean close from each side, the idle timeout, the open-sockets gauge, and
  a session closed at its next response once its token limit is spent;
- multipart uploads: `audio.transcriptions.create` through `AzureOpenAI` and
  the v1 client (routed by the `model` form field, small and large files,
  25 MB), `images.edit` with a file, the body limit;
- binary answers: `audio.speech.create` (WAV, MP3), `images.generate`, file
  contents, byte for byte.
"""

import base64
import json
import os
import re
import struct
import time

import httpx
import pytest
from openai import AzureOpenAI, OpenAI
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from conftest import start_gateway

KEY = "rt-team-key"
SMALL = "rt-small-key"
BACKEND_KEY = "rt-backend-key"
OPERATOR = "rt-operator-token"
API_VERSION = "2025-04-01-preview"
SMALL_TPM = 120
MAX_BODY = 27 * 1024 * 1024

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
backends:
  - name: dead
    url: http://127.0.0.1:1
    api_key: {{file: backend.key}}
  - name: eastus
    simulator: eastus
    api_key: {{file: backend.key}}
  - name: westus
    simulator: westus
    api_key: {{file: backend.key}}
    deployments: {{gpt-4o-transcribe: transcribe-west}}
pools:
  - name: both
    backends:
      - {{backend: eastus, priority: 1}}
      - {{backend: westus, priority: 2}}
  - name: west-only
    backends: [{{backend: westus}}]
  - name: dead-first
    backends:
      - {{backend: dead, priority: 1}}
      - {{backend: eastus, priority: 2}}
subscriptions:
  - name: team-rt
    primary_key: {{file: key}}
  - name: team-small
    primary_key: {{file: small.key}}
apis:
  - name: rt
    path: /openai
    pool: both
    deployment_pools:
      gpt-4o-transcribe: west-only
    max_request_body_bytes: {MAX_BODY}
    policies:
      - token_limit:
          counter_key: subscription
          tokens_per_minute: 1000000
      - emit_token_metric:
          dimensions: [subscription, api, deployment, backend_region]
  - name: deadfirst
    path: /deadfirst/openai
    pool: dead-first
    max_request_body_bytes: {MAX_BODY}
  - name: small
    path: /small/openai
    backends: [eastus]
    max_request_body_bytes: 1000000
    websocket_idle_seconds: 1
    policies:
      - token_limit:
          counter_key: subscription
          tokens_per_minute: {SMALL_TPM}
      - emit_token_metric:
          dimensions: [subscription, api]
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    (d / "key").write_text(KEY)
    (d / "small.key").write_text(SMALL)
    (d / "backend.key").write_text(BACKEND_KEY)
    (d / "operator.token").write_text(OPERATOR)
    g = start_gateway(d, CONFIG)
    yield g
    g.stop()


def ws_url(gw, path):
    return gw.url.replace("http://", "ws://") + path


def v1(gw, prefix="/openai", key=KEY):
    return OpenAI(base_url=f"{gw.url}{prefix}/v1/", api_key=key, max_retries=0)


def azure(gw, prefix="/openai", key=KEY):
    endpoint = gw.url + prefix.removesuffix("/openai")
    return AzureOpenAI(
        azure_endpoint=endpoint,
        api_key=key,
        api_version=API_VERSION,
        max_retries=0,
        websocket_base_url=ws_url(gw, prefix),
    )


def metric_sum(gw, name, **labels):
    text = httpx.get(gw.management + "/metrics", timeout=10).text
    total = 0.0
    for found, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        if all(f'{k}="{v}"' in found for k, v in labels.items()):
            total += float(value)
    return total


def wait_for(predicate, timeout=10.0, what="condition"):
    """Poll until `predicate()` holds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def recv_json(ws, timeout=10):
    return json.loads(ws.recv(timeout=timeout))


def until(ws, kind, timeout=10):
    """Events up to and including the first of type `kind`."""
    seen = []
    while True:
        ev = recv_json(ws, timeout)
        seen.append(ev)
        if ev["type"] == kind:
            return seen


def user_text(text):
    return {
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
    }


# --- Realtime ---------------------------------------------------------------------------------


def test_sdk_realtime_session_on_v1_is_charged_and_measured(gw):
    before = metric_sum(gw, "sluice_tokens_total", subscription="team-rt", deployment="gpt-rt")
    client = v1(gw)
    with client.realtime.connect(model="gpt-rt") as conn:
        first = conn.recv()
        assert first.type == "session.created"
        conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello lock keeper"}]}
        )
        conn.response.create()
        text = []
        done = None
        for event in conn:
            if event.type == "response.output_text.delta":
                text.append(event.delta)
            if event.type == "response.done":
                done = event
                break
        assert "".join(text)
        usage = done.response.usage
        assert usage.total_tokens > 0 and usage.input_tokens > 0 and usage.output_tokens > 0
        assert metric_sum(gw, "sluice_websockets_open", api="rt") == 1
    # The metric counts what the backend reported for the response.
    wait_for(
        lambda: metric_sum(gw, "sluice_tokens_total", subscription="team-rt", deployment="gpt-rt") - before
        == usage.total_tokens,
        what="the session's tokens in sluice_tokens_total",
    )
    wait_for(lambda: metric_sum(gw, "sluice_websockets_open", api="rt") == 0, what="the gauge back at 0")
    assert metric_sum(gw, "sluice_websocket_sessions_total", api="rt", end="closed") >= 1


def test_azure_client_realtime_on_the_api_version_form(gw):
    client = azure(gw)
    with client.realtime.connect(model="gpt-rt") as conn:
        assert conn.recv().type == "session.created"
        conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}
        )
        conn.response.create()
        kinds = []
        for event in conn:
            kinds.append(event.type)
            if event.type == "response.done":
                assert event.response.usage.total_tokens > 0
                break
        assert "response.created" in kinds


def test_browser_key_in_the_query_and_headers_on_the_upgrade(gw):
    url = ws_url(gw, f"/openai/v1/realtime?model=gpt-rt&api-key={KEY}")
    with ws_connect(url, open_timeout=10) as ws:
        # The handshake's answer is tagged like any other.
        assert ws.response.status_code == 101
        assert ws.response.headers["x-ms-region"] == "East US"
        # The client offered permessage-deflate; the backend never saw the
        # offer (the simulator echoes one it receives), so nothing is
        # compressed through the gateway.
        assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
        assert "x-sim-offered-extensions" not in ws.response.headers
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        assert recv_json(ws)["type"] == "session.created"
        ws.send(json.dumps(user_text("ping")))
        ws.send(json.dumps({"type": "response.create"}))
        done = until(ws, "response.done")[-1]
        assert done["response"]["usage"]["total_tokens"] > 0
        # The client closes cleanly: the gateway closes the backend's side.
        ws.close(code=1000, reason="bye")
    assert ws.close_code == 1000
    wait_for(lambda: metric_sum(gw, "sluice_websockets_open", api="rt") == 0, what="the gauge back at 0")


def test_a_key_carried_as_a_subprotocol_never_reaches_the_backend(gw):
    # OpenAI's browser form puts a key in a subprotocol; the gateway drops it
    # from the offer it forwards (and from traces), keeping the others.
    with ws_connect(
        ws_url(gw, "/openai/v1/realtime?model=gpt-rt"),
        additional_headers={"api-key": KEY},
        subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"],
        open_timeout=10,
    ) as ws:
        assert ws.subprotocol == "realtime"
        assert ws.response.headers["x-sim-offered-protocols"] == "realtime"
        assert recv_json(ws)["type"] == "session.created"


def test_the_simulator_does_see_an_offer_made_to_it_directly(gw):
    # The control for the test above: straight to the simulator, the offer arrives.
    sim = gw.simulators["eastus"].replace("http://", "ws://")
    with ws_connect(
        sim + "/openai/v1/realtime?model=gpt-rt", additional_headers={"api-key": BACKEND_KEY}, open_timeout=10
    ) as ws:
        assert "permessage-deflate" in ws.response.headers["x-sim-offered-extensions"]


def test_a_wrong_key_is_refused_before_the_upgrade_like_any_call(gw):
    for url, headers in [
        (ws_url(gw, "/openai/v1/realtime?model=gpt-rt"), {"api-key": "wrong"}),
        (ws_url(gw, "/openai/v1/realtime?model=gpt-rt&api-key=wrong"), {}),
        (ws_url(gw, "/openai/v1/realtime?model=gpt-rt"), {}),
    ]:
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(url, additional_headers=headers, open_timeout=10)
        resp = refused.value.response
        assert resp.status_code == 401
        body = json.loads(resp.body)
        assert body["statusCode"] == 401 and "subscription key" in body["message"]
    # No deployment named: a 400 with the same shape.
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(ws_url(gw, "/openai/v1/realtime"), additional_headers={"api-key": KEY}, open_timeout=10)
    assert refused.value.response.status_code == 400
    assert "deployment" in json.loads(refused.value.response.body)["message"]


def test_failover_before_the_upgrade(gw):
    # East US answers the handshake with a 500: the gateway upgrades on West US.
    headers = {"api-key": KEY, "x-sim-fault": "status=500", "x-sim-fault-region": "eastus"}
    with ws_connect(ws_url(gw, "/openai/v1/realtime?model=gpt-rt"), additional_headers=headers, open_timeout=10) as ws:
        assert ws.response.headers["x-ms-region"] == "West US"
        assert recv_json(ws)["type"] == "session.created"


def test_the_server_closing_closes_the_client(gw):
    with ws_connect(
        ws_url(gw, "/openai/v1/realtime?model=gpt-rt"), additional_headers={"api-key": KEY}, open_timeout=10
    ) as ws:
        assert recv_json(ws)["type"] == "session.created"
        ws.send(json.dumps({"type": "sim.close", "code": 1000}))
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    wait_for(lambda: metric_sum(gw, "sluice_websockets_open", api="rt") == 0, what="the gauge back at 0")


def test_an_idle_session_is_closed(gw):
    # The `small` API's idle timeout is one second.
    with ws_connect(
        ws_url(gw, "/small/openai/v1/realtime?model=gpt-rt"), additional_headers={"api-key": SMALL}, open_timeout=10
    ) as ws:
        assert recv_json(ws)["type"] == "session.created"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(timeout=15)
        assert time.monotonic() - started < 14
    wait_for(lambda: metric_sum(gw, "sluice_websockets_open", api="small") == 0, what="the gauge back at 0")


def test_a_session_over_its_token_limit_is_closed_at_its_next_response(gw):
    url = ws_url(gw, "/small/openai/v1/realtime?model=gpt-rt")
    with ws_connect(url, additional_headers={"api-key": SMALL}, open_timeout=10) as ws:
        assert recv_json(ws)["type"] == "session.created"
        spent = 0
        # Responses until the per-minute window (120 tokens) is spent.
        for _ in range(20):
            ws.send(json.dumps(user_text("Tell me everything about canal locks " * 3)))
            ws.send(json.dumps({"type": "response.create", "response": {"sim_deltas": 30}}))
            done = until(ws, "response.done")[-1]
            spent += done["response"]["usage"]["total_tokens"]
            if spent > SMALL_TPM:
                break
        assert spent > SMALL_TPM

        # The charge is made beside the relay; once it is, a new handshake
        # is refused like any call over the limit (429, APIM's message).
        def refused_now():
            try:
                ws_connect(url, additional_headers={"api-key": SMALL}, open_timeout=10).close()
                return False
            except InvalidStatus as e:
                assert e.response.status_code == 429
                assert "Token limit is exceeded" in json.loads(e.response.body)["message"]
                return True

        wait_for(refused_now, what="the session's charge to spend the window")
        # The open session's next response is cut: its response.created, then the close.
        ws.send(json.dumps({"type": "response.create"}))
        kinds = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                kinds.append(recv_json(ws)["type"])
        assert kinds == ["response.created"]
        frame = closed.value.rcvd
        assert frame.code == 1008
        assert frame.reason.startswith("Token limit is exceeded. Try again in")
    assert metric_sum(gw, "sluice_websocket_sessions_total", api="small", end="token_limit") == 1


# --- multipart uploads ------------------------------------------------------------------------


def wav_bytes(n_samples):
    data = b"\x00\x01" * n_samples
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16
    ) + b"data" + struct.pack("<I", len(data))
    return header + data


@pytest.mark.parametrize("size", [2_000, 300_000])
def test_transcriptions_through_azure_and_v1_clients(gw, size):
    audio = wav_bytes(size)
    before = metric_sum(gw, "sluice_tokens_total", subscription="team-rt", deployment="gpt-4o-transcribe")
    charged = 0
    # AzureOpenAI: the deployment is in the path.
    r = azure(gw).audio.transcriptions.with_raw_response.create(
        model="gpt-4o-transcribe", file=("lock.wav", audio, "audio/wav")
    )
    t = r.parse()
    assert t.text
    assert r.headers["x-ms-region"] == "West US"  # deployment_pools: west-only
    assert r.headers["x-sim-deployment"] == "transcribe-west"  # renamed for West US
    charged += t.usage.total_tokens
    # The v1 client: the deployment is the `model` form field, read from the
    # parts before the file (a large file streams, it is not held).
    r = v1(gw).audio.transcriptions.with_raw_response.create(
        model="gpt-4o-transcribe", file=("lock.wav", audio, "audio/wav")
    )
    t2 = r.parse()
    assert t2.text == t.text
    assert r.headers["x-ms-region"] == "West US"
    # The form's `model` was renamed for West US (in the parts read before
    # routing, for the large file; in the body read whole, for the small one).
    assert r.headers["x-sim-deployment"] == "transcribe-west"
    charged += t2.usage.total_tokens
    wait_for(
        lambda: metric_sum(gw, "sluice_tokens_total", subscription="team-rt", deployment="gpt-4o-transcribe") - before
        == charged,
        what="transcription usage in the metrics",
    )
    # Translations take the same form.
    tr = v1(gw).audio.translations.create(model="gpt-4o-transcribe", file=("lock.wav", audio, "audio/wav"))
    assert tr.text


def multipart(fields, boundary="sluice-test-boundary-7d2f"):
    """A multipart/form-data body: (name, value) or (name, (filename, bytes))."""
    out = b""
    for name, value in fields:
        if isinstance(value, tuple):
            filename, data = value
            head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: audio/wav'
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"', value.encode()
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_streamed_uploads_chunked_model_after_the_file_and_a_connect_failure(gw):
    audio = wav_bytes(150_000)
    expected = v1(gw).audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", audio, "audio/wav")).text
    headers = {"api-key": KEY}
    # Chunked, the model first: routed by it (West US only), the bytes intact
    # (the simulator's text depends on the file's name and size).
    body, ctype = multipart([("model", "gpt-4o-transcribe"), ("file", ("a.wav", audio))])
    pieces = [body[i : i + 7000] for i in range(0, len(body), 7000)]
    r = httpx.post(f"{gw.url}/openai/v1/audio/transcriptions", content=iter(pieces),
                   headers={**headers, "content-type": ctype}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["x-ms-region"] == "West US" and r.json()["text"] == expected
    assert r.headers["x-sim-deployment"] == "transcribe-west"
    # The model after a large file is not looked for: the API's pool.
    body, ctype = multipart([("file", ("a.wav", audio)), ("model", "gpt-4o-transcribe")])
    r = httpx.post(f"{gw.url}/openai/v1/audio/transcriptions", content=body,
                   headers={**headers, "content-type": ctype}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["x-ms-region"] == "East US" and r.json()["text"] == expected
    # The first backend refuses the connection: the parts read before
    # routing are sent again, once, to the next one.
    body, ctype = multipart([("model", "whisper"), ("file", ("a.wav", audio))])
    r = httpx.post(f"{gw.url}/deadfirst/openai/v1/audio/transcriptions", content=body,
                   headers={**headers, "content-type": ctype}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["x-ms-region"] == "East US" and r.json()["text"] == expected


def test_a_25_mb_upload_passes_and_one_over_the_limit_is_refused(gw):
    audio = wav_bytes(25 * 1024 * 1024 // 2)
    t = v1(gw).audio.transcriptions.create(model="gpt-4o-transcribe", file=("big.wav", audio, "audio/wav"))
    assert t.text
    # Over the `small` API's 1 MB: 413, APIM-shaped.
    r = httpx.post(
        f"{gw.url}/small/openai/v1/audio/transcriptions",
        headers={"api-key": SMALL},
        files={"file": ("x.wav", wav_bytes(600_000), "audio/wav")},
        data={"model": "whisper"},
        timeout=30,
    )
    assert r.status_code == 413
    assert r.json()["statusCode"] == 413


def test_image_edit_with_a_file_and_generation_return_png(gw):
    png_magic = b"\x89PNG\r\n\x1a\n"
    gen = v1(gw).images.generate(model="gpt-image-1", prompt="a canal lock at dawn", n=1)
    img = base64.b64decode(gen.data[0].b64_json)
    assert img.startswith(png_magic)
    edit = azure(gw).images.edit(model="gpt-image-1", image=("lock.png", img, "image/png"), prompt="add a boat")
    assert base64.b64decode(edit.data[0].b64_json).startswith(png_magic)
    edit = v1(gw).images.edit(model="gpt-image-1", image=("lock.png", img, "image/png"), prompt="add a boat")
    assert base64.b64decode(edit.data[0].b64_json).startswith(png_magic)


# --- binary answers ---------------------------------------------------------------------------


def test_speech_comes_back_as_bytes_with_its_content_type(gw):
    for client in (v1(gw), azure(gw)):
        r = client.audio.speech.with_raw_response.create(
            model="tts", voice="alloy", input="The lock is open.", response_format="wav"
        )
        assert r.headers["content-type"] == "audio/wav"
        body = r.http_response.content
        assert body[:4] == b"RIFF" and body[8:12] == b"WAVE"
        assert int(r.headers["content-length"]) == len(body)
    r = v1(gw).audio.speech.with_raw_response.create(model="tts", voice="alloy", input="Open.", response_format="mp3")
    assert r.headers["content-type"] == "audio/mpeg"
    assert r.headers["content-type"] == "audio/mpeg" and len(r.http_response.content) > 0


def test_file_contents_round_trip_byte_for_byte(gw):
    payload = os.urandom(200_000)
    c = v1(gw)
    f = c.files.create(file=("blob.jsonl", payload), purpose="batch")
    got = c.files.content(f.id)
    assert got.read() == payload
    c.files.delete(f.id)
