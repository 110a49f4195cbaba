//! Realtime sessions over WebSocket, with a tungstenite client against a simulator on
//! 127.0.0.1:0.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use http::StatusCode;
use serde_json::{Value, json};
use sluice_sim::{Fault, RegionConfig, SimHandle};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::client::Response as Handshake;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

type Client = WebSocketStream<TcpStream>;

const KEY: &str = "rt-test-key";
const GA: &str = "/openai/v1/realtime?model=gpt-4o-realtime";
const PREVIEW: &str =
    "/openai/realtime?api-version=2025-04-01-preview&deployment=gpt-4o-realtime-preview";
/// Upper bound on any single wait in these tests (a hang fails instead of blocking CI).
const WAIT: Duration = Duration::from_secs(30);

async fn start_keyed() -> SimHandle {
    let mut cfg = RegionConfig::new("eastus");
    cfg.api_key = Some(KEY.into());
    start(cfg).await
}

/// Open a WebSocket to `path` with extra request headers.
async fn connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Result<(Client, Handshake), WsError> {
    let mut req = format!("ws://{addr}{path}").into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    let stream = TcpStream::connect(addr).await.expect("connect");
    tokio_tungstenite::client_async(req, stream).await
}

async fn connect_ok(addr: SocketAddr, path: &str) -> (Client, Handshake) {
    connect(addr, path, &[("api-key", KEY)])
        .await
        .expect("handshake succeeds")
}

/// The refused handshake's status and JSON body.
async fn refused(
    addr: SocketAddr,
    path: &str,
    headers: &[(&'static str, &str)],
) -> (StatusCode, Value) {
    match connect(addr, path, headers).await {
        Err(WsError::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
            (resp.status(), v)
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("handshake should be refused"),
    }
}

/// The next text event: raw text and parsed JSON. Every event must start with its `type`.
async fn next_event(ws: &mut Client) -> (String, Value) {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("no transport error");
        match msg {
            Message::Text(t) => {
                let raw = t.as_str().to_string();
                assert!(raw.starts_with("{\"type\":\""), "type is not first: {raw}");
                let v: Value = serde_json::from_str(&raw).expect("JSON event");
                assert!(
                    v["event_id"].as_str().is_some_and(|s| !s.is_empty()),
                    "{raw}"
                );
                return (raw, v);
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text event, got {other:?}"),
        }
    }
}

async fn next_json(ws: &mut Client) -> Value {
    next_event(ws).await.1
}

async fn send(ws: &mut Client, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Events up to and including the first of type `last`.
async fn until(ws: &mut Client, last: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let v = next_json(ws).await;
        let done = v["type"] == last;
        out.push(v);
        if done {
            return out;
        }
    }
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["type"] == kind).count()
}

/// The Close frame ending the stream (skipping anything queued before it).
async fn close_frame(ws: &mut Client) -> Option<(CloseCode, String)> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(frame))) => {
                return frame.map(|f| (f.code, f.reason.as_str().to_string()));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("transport error before Close: {e}"),
            None => panic!("stream ended without a Close frame"),
        }
    }
}

async fn wait_for_sessions(sim: &SimHandle, n: usize) {
    tokio::time::timeout(WAIT, async {
        while sim.realtime_sessions() != n {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("session count reached");
}

#[tokio::test]
async fn ga_session_end_to_end() {
    let sim = start_keyed().await;
    let (mut ws, hs) = connect(
        sim.addr(),
        GA,
        &[
            ("api-key", KEY),
            (
                "sec-websocket-extensions",
                "permessage-deflate; client_max_window_bits",
            ),
            ("x-ms-client-request-id", "rt-1"),
        ],
    )
    .await
    .expect("handshake");
    assert_eq!(hs.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(
        hs.headers().get("sec-websocket-extensions").is_none(),
        "no deflate"
    );
    assert_eq!(hs.headers()["x-ms-region"], "East US");
    assert_eq!(hs.headers()["x-ms-client-request-id"], "rt-1");
    assert_eq!(sim.realtime_sessions(), 1);
    assert_eq!(sim.realtime_sessions_total(), 1);

    let mut ids = HashSet::new();
    let (_, created) = next_event(&mut ws).await;
    assert_eq!(created["type"], "session.created");
    let session = &created["session"];
    assert!(session["id"].as_str().unwrap().starts_with("sess_"));
    assert_eq!(session["model"], "gpt-4o-realtime");
    assert_eq!(session["object"], "realtime.session");
    assert_eq!(session["output_modalities"], json!(["audio"]));
    ids.insert(created["event_id"].as_str().unwrap().to_string());

    send(
        &mut ws,
        json!({"type": "session.update", "event_id": "c1", "session": {
            "type": "realtime",
            "instructions": "Be brief.",
            "output_modalities": ["text", "audio"],
            "audio": {"output": {"voice": "verse"}},
        }}),
    )
    .await;
    let updated = next_json(&mut ws).await;
    assert_eq!(updated["type"], "session.updated");
    let s = &updated["session"];
    assert_eq!(s["id"], session["id"]);
    assert_eq!(s["instructions"], "Be brief.");
    assert_eq!(s["output_modalities"], json!(["text", "audio"]));
    assert_eq!(s["audio"]["output"]["voice"], "verse");
    // Merged, not replaced.
    assert_eq!(s["audio"]["output"]["format"]["rate"], 24_000);

    send(
        &mut ws,
        json!({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Tell me about canals."}],
        }}),
    )
    .await;
    let item = next_json(&mut ws).await;
    assert_eq!(item["type"], "conversation.item.created");
    assert_eq!(item["previous_item_id"], Value::Null);
    let item_id = item["item"]["id"].as_str().unwrap().to_string();
    assert!(item_id.starts_with("item_"));
    assert_eq!(item["item"]["content"][0]["text"], "Tell me about canals.");

    send(&mut ws, json!({"type": "response.create"})).await;
    let events = until(&mut ws, "response.done").await;
    let t = types(&events);
    assert_eq!(t[0], "response.created");
    assert_eq!(t[1], "response.output_item.added");
    assert_eq!(events[0]["response"]["status"], "in_progress");
    let deltas: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert!((2..=4).contains(&deltas.len()), "{t:?}");
    let text = deltas.concat();
    assert!(text.ends_with(" from eastus"), "{text}");
    assert_eq!(count(&events, "response.output_audio.delta"), deltas.len());
    assert_eq!(
        count(&events, "response.output_audio_transcript.delta"),
        deltas.len()
    );
    for e in events
        .iter()
        .filter(|e| e["type"] == "response.output_audio.delta")
    {
        let pcm = base64_decode(e["delta"].as_str().unwrap());
        assert_eq!(pcm.len(), 2_400, "50 ms of 24 kHz PCM16");
    }
    assert!(t.contains(&"response.output_text.done"));
    assert!(t.contains(&"response.output_audio.done"));
    let pos = |k: &str| t.iter().position(|x| *x == k).unwrap();
    assert!(pos("response.output_item.done") < pos("response.done"));

    let done = &events.last().unwrap()["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["id"], events[0]["response"]["id"]);
    assert_eq!(done["output"][0]["content"][0]["text"], text);
    assert_eq!(done["output"][0]["content"][1]["transcript"], text);
    let u = &done["usage"];
    let n = |v: &Value| v.as_u64().unwrap();
    assert!(n(&u["input_tokens"]) > 0);
    assert_eq!(
        n(&u["input_token_details"]["text_tokens"]),
        n(&u["input_tokens"])
    );
    assert_eq!(n(&u["input_token_details"]["audio_tokens"]), 0);
    assert_eq!(n(&u["input_token_details"]["cached_tokens"]), 0);
    assert_eq!(n(&u["output_token_details"]["text_tokens"]), 4);
    assert_eq!(
        n(&u["output_token_details"]["audio_tokens"]),
        deltas.len() as u64
    );
    assert_eq!(n(&u["output_tokens"]), 4 + deltas.len() as u64);
    assert_eq!(
        n(&u["total_tokens"]),
        n(&u["input_tokens"]) + n(&u["output_tokens"])
    );
    let first_input = n(&u["input_tokens"]);
    for e in &events {
        assert!(
            ids.insert(e["event_id"].as_str().unwrap().to_string()),
            "duplicate event_id {e}"
        );
    }

    // Unknown events and bad JSON get error events; the session carries on.
    send(
        &mut ws,
        json!({"type": "conversation.teleport", "event_id": "c9"}),
    )
    .await;
    let err = next_json(&mut ws).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["error"]["type"], "invalid_request_error");
    assert_eq!(err["error"]["code"], "unknown_event");
    assert_eq!(err["error"]["event_id"], "c9");
    ws.send(Message::text("{not json")).await.unwrap();
    let err = next_json(&mut ws).await;
    assert_eq!(
        (err["type"].as_str(), err["error"]["code"].as_str()),
        (Some("error"), Some("invalid_json"))
    );

    // The pad hook: one audio delta of the asked size.
    send(&mut ws, json!({"type": "sim.pad", "bytes": 100_000})).await;
    let pad = next_json(&mut ws).await;
    assert_eq!(pad["type"], "response.output_audio.delta");
    assert_eq!(pad["delta"].as_str().unwrap().len(), 100_000);

    // A long text-only response: sim_deltas sets the number of deltas; the conversation (now
    // with the first answer) costs more input.
    send(
        &mut ws,
        json!({"type": "response.create", "response": {"sim_deltas": 300, "output_modalities": ["text"]}}),
    )
    .await;
    let events = until(&mut ws, "response.done").await;
    assert_eq!(count(&events, "response.output_text.delta"), 300);
    assert_eq!(count(&events, "response.output_audio.delta"), 0);
    let u = &events.last().unwrap()["response"]["usage"];
    assert_eq!(n(&u["output_token_details"]["text_tokens"]), 300);
    assert_eq!(n(&u["output_token_details"]["audio_tokens"]), 0);
    assert!(n(&u["input_tokens"]) > first_input, "{u}");

    // max_output_tokens sets the length too.
    send(
        &mut ws,
        json!({"type": "response.create", "response": {"max_output_tokens": 12, "output_modalities": ["text"]}}),
    )
    .await;
    let events = until(&mut ws, "response.done").await;
    let u = &events.last().unwrap()["response"]["usage"];
    assert_eq!(n(&u["output_token_details"]["text_tokens"]), 12);

    // Ping is answered with Pong.
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(b"are you there".to_vec().into()));

    // A client Close is answered with Close, and the session is gone.
    ws.close(None).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("{e}"),
        }
    }
    wait_for_sessions(&sim, 0).await;
    assert_eq!(sim.realtime_sessions_total(), 1);
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

#[tokio::test]
async fn preview_path_uses_preview_names_and_query_key() {
    let sim = start_keyed().await;
    let path = format!("{PREVIEW}&api-key={KEY}");
    let (mut ws, _) = connect(sim.addr(), &path, &[])
        .await
        .expect("query key accepted");
    let created = next_json(&mut ws).await;
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["session"]["model"], "gpt-4o-realtime-preview");
    assert_eq!(created["session"]["modalities"], json!(["text", "audio"]));

    // Audio in: appended, committed, counted.
    let audio = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(vec![0u8; 48_000])
    };
    send(
        &mut ws,
        json!({"type": "input_audio_buffer.append", "audio": audio}),
    )
    .await;
    send(&mut ws, json!({"type": "input_audio_buffer.commit"})).await;
    let committed = next_json(&mut ws).await;
    assert_eq!(committed["type"], "input_audio_buffer.committed");
    let created_item = next_json(&mut ws).await;
    assert_eq!(created_item["type"], "conversation.item.created");
    assert_eq!(created_item["item"]["id"], committed["item_id"]);

    send(
        &mut ws,
        json!({"type": "response.create", "response": {"sim_deltas": 5}}),
    )
    .await;
    let events = until(&mut ws, "response.done").await;
    assert_eq!(count(&events, "response.text.delta"), 5);
    assert_eq!(count(&events, "response.audio.delta"), 5);
    assert_eq!(count(&events, "response.audio_transcript.delta"), 5);
    assert_eq!(count(&events, "response.output_text.delta"), 0);
    assert!(types(&events).contains(&"response.audio_transcript.done"));
    let done = &events.last().unwrap()["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["modalities"], json!(["text", "audio"]));
    assert_eq!(done["output"][0]["content"][0]["type"], "text");
    assert_eq!(done["output"][0]["content"][1]["type"], "audio");
    let u = &done["usage"];
    // 48,000 bytes = 1 s of 24 kHz PCM16 = 10 audio tokens.
    assert_eq!(u["input_token_details"]["audio_tokens"], 10);
    assert_eq!(u["output_token_details"]["text_tokens"], 5);
    assert_eq!(u["output_token_details"]["audio_tokens"], 5);

    send(&mut ws, json!({"type": "sim.pad", "bytes": 10})).await;
    let pad = next_json(&mut ws).await;
    assert_eq!(pad["type"], "response.audio.delta");
    assert_eq!(pad["delta"].as_str().unwrap().len(), 12);

    send(&mut ws, json!({"type": "input_audio_buffer.commit"})).await;
    let err = next_json(&mut ws).await;
    assert_eq!(err["error"]["code"], "input_audio_buffer_commit_empty");
}

#[tokio::test]
async fn wrong_or_missing_key_is_refused_with_401() {
    let sim = start_keyed().await;
    for headers in [
        vec![("api-key", "wrong")],
        vec![("authorization", "Bearer wrong")],
        vec![],
    ] {
        let (status, body) = refused(sim.addr(), GA, &headers).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(body["error"]["code"], "401");
    }
    let (status, _) = refused(sim.addr(), &format!("{PREVIEW}&api-key=wrong"), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Bearer works too.
    let bearer = format!("Bearer {KEY}");
    let (mut ws, _) = connect(sim.addr(), GA, &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "session.created");
    assert_eq!(sim.realtime_sessions_total(), 1);
}

#[tokio::test]
async fn bad_handshakes_are_400() {
    let sim = start_keyed().await;
    let (status, body) = refused(sim.addr(), "/openai/v1/realtime", &[("api-key", KEY)]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'model'"),
        "{body}"
    );
    let (status, body) = refused(
        sim.addr(),
        "/openai/realtime?api-version=2025-04-01-preview",
        &[("api-key", KEY)],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'deployment'")
    );
    // A plain GET (no upgrade).
    let r = common::send(sim.addr(), Call::get(GA).header("api-key", KEY)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    r.assert_azure_headers("East US");
}

#[tokio::test]
async fn faults_answer_instead_of_101() {
    let sim = start_keyed().await;
    let (status, body) = refused(
        sim.addr(),
        GA,
        &[
            ("api-key", KEY),
            ("x-sim-fault", "status=429"),
            ("x-sim-fault-region", "eastus"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"]["code"], "429");
    // Aimed at another region: no fault here.
    let (mut ws, _) = connect(
        sim.addr(),
        GA,
        &[
            ("api-key", KEY),
            ("x-sim-fault", "status=429"),
            ("x-sim-fault-region", "westus"),
        ],
    )
    .await
    .expect("fault for another region");
    assert_eq!(next_json(&mut ws).await["type"], "session.created");

    sim.set_fault(Fault::Status(500), Some(1));
    let (status, body) = refused(sim.addr(), GA, &[("api-key", KEY)]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["error"]["code"], "InternalServerError");
    sim.set_fault(Fault::Throttle(Duration::from_millis(2500)), Some(1));
    match connect(sim.addr(), GA, &[("api-key", KEY)]).await {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(resp.headers()["retry-after-ms"], "2500");
        }
        other => panic!("expected a 429, got {:?}", other.map(|_| ())),
    }
    let (mut ws, _) = connect_ok(sim.addr(), GA).await;
    assert_eq!(next_json(&mut ws).await["type"], "session.created");
    assert_eq!(sim.realtime_sessions_total(), 2);
}

#[tokio::test]
async fn stream_fail_header_fails_responses() {
    let sim = start_keyed().await;
    let (mut ws, _) = connect(
        sim.addr(),
        GA,
        &[("api-key", KEY), ("x-sim-stream-fail", "response.failed")],
    )
    .await
    .unwrap();
    next_json(&mut ws).await;
    send(
        &mut ws,
        json!({"type": "response.create", "response": {"sim_deltas": 10}}),
    )
    .await;
    let events = until(&mut ws, "response.done").await;
    assert_eq!(count(&events, "response.output_text.delta"), 2);
    let done = &events.last().unwrap()["response"];
    assert_eq!(done["status"], "failed");
    assert_eq!(done["status_details"]["error"]["code"], "server_error");

    let (mut ws, _) = connect(
        sim.addr(),
        PREVIEW,
        &[("api-key", KEY), ("x-sim-stream-fail", "error")],
    )
    .await
    .unwrap();
    next_json(&mut ws).await;
    send(&mut ws, json!({"type": "response.create"})).await;
    let events = until(&mut ws, "error").await;
    assert_eq!(events.last().unwrap()["error"]["code"], "server_error");
    let (code, _) = close_frame(&mut ws).await.expect("close frame");
    assert_eq!(code, CloseCode::Error);
}

#[tokio::test]
async fn session_limit_refuses_with_429_and_frees_on_close() {
    let sim = start_keyed().await;
    sim.set_max_realtime_sessions(1);
    let (mut first, _) = connect_ok(sim.addr(), GA).await;
    next_json(&mut first).await;
    let (status, _) = refused(sim.addr(), GA, &[("api-key", KEY)]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let stats = common::send(sim.addr(), Call::get("/_sim/stats"))
        .await
        .json();
    assert_eq!(stats["realtime_sessions"], 1);
    assert_eq!(stats["realtime_sessions_total"], 1);
    first.close(None).await.unwrap();
    while let Some(Ok(_)) = tokio::time::timeout(WAIT, first.next()).await.unwrap() {}
    wait_for_sessions(&sim, 0).await;
    let (mut again, _) = connect_ok(sim.addr(), GA).await;
    assert_eq!(next_json(&mut again).await["type"], "session.created");
}

#[tokio::test]
async fn shutdown_closes_sessions_with_going_away() {
    let sim = start_keyed().await;
    let (mut ws, _) = connect_ok(sim.addr(), PREVIEW).await;
    next_json(&mut ws).await;
    sim.shutdown();
    let (code, reason) = close_frame(&mut ws).await.expect("close frame");
    assert_eq!(code, CloseCode::Away);
    assert_eq!(reason, "server shutting down");
    wait_for_sessions(&sim, 0).await;
}

#[tokio::test(start_paused = true)]
async fn idle_sessions_are_closed_after_ten_minutes() {
    let sim = start_keyed().await;
    let (mut ws, _) = connect_ok(sim.addr(), GA).await;
    next_json(&mut ws).await;
    let before = tokio::time::Instant::now();
    // The paused clock jumps to the server's idle deadline once nothing else can run.
    let msg = ws.next().await.expect("a frame").expect("no error");
    let Message::Close(Some(frame)) = msg else {
        panic!("expected Close, got {msg:?}")
    };
    assert_eq!(frame.code, CloseCode::Normal);
    assert_eq!(frame.reason.as_str(), "idle timeout");
    assert!(
        before.elapsed() >= Duration::from_secs(600),
        "{:?}",
        before.elapsed()
    );
}

#[tokio::test]
async fn sim_close_makes_the_server_close() {
    let sim = start_keyed().await;
    let (mut ws, _) = connect_ok(sim.addr(), GA).await;
    next_json(&mut ws).await;
    send(&mut ws, json!({"type": "sim.close", "code": 9})).await;
    assert_eq!(next_json(&mut ws).await["error"]["param"], "code");
    send(
        &mut ws,
        json!({"type": "sim.close", "code": 4001, "reason": "bye"}),
    )
    .await;
    let (code, reason) = close_frame(&mut ws).await.expect("close frame");
    assert_eq!((u16::from(code), reason.as_str()), (4001, "bye"));
    wait_for_sessions(&sim, 0).await;

    let (mut ws, _) = connect_ok(sim.addr(), PREVIEW).await;
    next_json(&mut ws).await;
    send(&mut ws, json!({"type": "sim.close"})).await;
    let (code, _) = close_frame(&mut ws).await.expect("close frame");
    assert_eq!(code, CloseCode::Normal);
}
