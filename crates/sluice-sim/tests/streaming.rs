//! SSE streams: event order, Azure's first event, usage chunk, [DONE], pacing.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use sluice_sim::{Latency, RegionConfig};

fn stream_body(max_tokens: u64, include_usage: bool) -> Value {
    let mut b = chat_body("Tell me a story");
    b["stream"] = json!(true);
    b["max_tokens"] = json!(max_tokens);
    if include_usage {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

fn assert_first_event(v: &Value) {
    assert_eq!(v["choices"], json!([]));
    assert_eq!(v["created"], 0);
    assert_eq!(v["id"], "");
    assert_eq!(v["model"], "");
    assert_eq!(v["object"], "");
    assert_eq!(v["prompt_filter_results"][0]["prompt_index"], 0);
}

#[tokio::test]
async fn chat_stream_event_order_without_usage() {
    let sim = start(RegionConfig::new("westeurope")).await;
    let s = send_streaming(sim.addr(), Call::post(CHAT, stream_body(3, false))).await;
    assert_eq!(s.status, StatusCode::OK);
    assert_eq!(
        s.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(s.header("x-ms-region"), Some("West Europe"));
    assert!(s.header("apim-request-id").is_some());

    let (events, done) = s.json_events();
    assert!(done, "stream ends with [DONE]");
    // first + role + 3 words + finish
    assert_eq!(events.len(), 6, "{events:#?}");
    assert_first_event(&events[0]);

    let id = events[1]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for e in &events[1..] {
        assert_eq!(e["object"], "chat.completion.chunk");
        assert_eq!(e["id"], id);
        assert_eq!(e["created"], events[1]["created"]);
        assert_eq!(e["model"], "gpt-4o");
        assert!(
            e.get("usage").is_none(),
            "no usage key without include_usage"
        );
        assert_eq!(e["choices"][0]["index"], 0);
    }
    assert_eq!(events[1]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(events[1]["choices"][0]["delta"]["content"], "");
    let text: String = events[2..5]
        .iter()
        .map(|e| {
            assert!(e["choices"][0]["finish_reason"].is_null());
            e["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(text.split(' ').count(), 3);
    assert!(!text.starts_with(' '));
    assert!(
        events[3]["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap()
            .starts_with(' ')
    );
    assert_eq!(events[5]["choices"][0]["delta"], json!({}));
    assert_eq!(events[5]["choices"][0]["finish_reason"], "length");

    // Each SSE event went out as its own well-formed `data: ...\n\n` block.
    let raw: Vec<u8> = s.frames.iter().flat_map(|(_, b)| b.to_vec()).collect();
    let raw = String::from_utf8(raw).unwrap();
    assert!(raw.starts_with("data: {"));
    assert!(raw.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn chat_stream_usage_chunk_only_with_include_usage() {
    let sim = start(RegionConfig::new("eastus")).await;
    let s = send_streaming(sim.addr(), Call::post(CHAT, stream_body(2, true))).await;
    let (events, done) = s.json_events();
    assert!(done);
    // first + role + 2 words + finish + usage
    assert_eq!(events.len(), 6, "{events:#?}");
    assert_first_event(&events[0]);
    for e in &events[1..5] {
        assert!(e["usage"].is_null() && e.get("usage").is_some());
    }
    let usage = &events[5];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["object"], "chat.completion.chunk");
    // o200k: 3 per message + "user" (1) + "Tell me a story" (4), + 3.
    assert_eq!(usage["usage"]["prompt_tokens"], 11);
    assert_eq!(usage["usage"]["completion_tokens"], 2);
    assert_eq!(usage["usage"]["total_tokens"], 13);
}

#[tokio::test]
async fn chat_stream_default_length_finishes_with_stop() {
    let mut cfg = RegionConfig::new("eastus");
    cfg.completion_tokens = 4;
    let sim = start(cfg).await;
    let mut body = chat_body("hi");
    body["stream"] = json!(true);
    let s = send_streaming(sim.addr(), Call::post(CHAT, body)).await;
    let (events, done) = s.json_events();
    assert!(done);
    assert_eq!(events.len(), 1 + 1 + 4 + 1);
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn legacy_completion_stream() {
    let sim = start(RegionConfig::new("eastus")).await;
    let body = json!({
        "prompt": "abcdefgh",
        "max_tokens": 3,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let s = send_streaming(sim.addr(), Call::post(COMPLETIONS, body)).await;
    assert_eq!(
        s.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    let (events, done) = s.json_events();
    assert!(done);
    // first + 3 words + finish + usage
    assert_eq!(events.len(), 6, "{events:#?}");
    assert_first_event(&events[0]);
    for e in &events[1..] {
        assert_eq!(e["object"], "text_completion");
    }
    let text: String = events[1..4]
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text.split(' ').count(), 3);
    assert_eq!(events[4]["choices"][0]["finish_reason"], "length");
    assert!(events[4]["choices"][0]["logprobs"].is_null());
    assert_eq!(events[5]["choices"], json!([]));
    // "abcdefgh" is one o200k token.
    assert_eq!(events[5]["usage"]["prompt_tokens"], 1);
    assert_eq!(events[5]["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn chunks_wait_for_their_latency() {
    let mut cfg = RegionConfig::new("eastus");
    let ttft = Duration::from_millis(20);
    let per_token = Duration::from_millis(15);
    cfg.latency = Latency {
        time_to_first_token: ttft,
        per_token,
        embeddings: Duration::ZERO,
    };
    let sim = start(cfg).await;
    let words = 6u32;
    let s = send_streaming(
        sim.addr(),
        Call::post(CHAT, stream_body(u64::from(words), false)),
    )
    .await;
    let events = s.events();
    assert_eq!(events.len(), 1 + 1 + words as usize + 1 + 1);

    // Arrival times never go backwards.
    for pair in events.windows(2) {
        assert!(pair[0].0 <= pair[1].0);
    }
    // Lower bounds only, set by the simulator's own sleeps: a loaded
    // machine can only make them longer. (That events are not held back is
    // `a_pause_in_the_stream_does_not_hold_back_earlier_events`.)
    // Causality: the last word cannot arrive before ttft + n * per_token after sending.
    let last_word_at = events[1 + words as usize].0;
    assert!(last_word_at - s.sent_at >= ttft + per_token * words);
    // The role chunk waits for the time to first token.
    assert!(events[1].0 - s.sent_at >= ttft);
}

#[tokio::test]
async fn a_pause_in_the_stream_does_not_hold_back_earlier_events() {
    // No time to first token, then an hour before each word: Azure's first
    // event and the role chunk must reach the client while the simulator
    // waits for the first word. Were the stream buffered, they would not
    // come before the guard below gives up (a minute, against an hour):
    // nothing is measured.
    let mut cfg = RegionConfig::new("eastus");
    cfg.latency = Latency {
        time_to_first_token: Duration::ZERO,
        per_token: Duration::from_secs(3600),
        embeddings: Duration::ZERO,
    };
    let sim = start(cfg).await;
    let first_two = async {
        let resp = open(sim.addr(), Call::post(CHAT, stream_body(2, false))).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut text = String::new();
        while text.matches("\n\n").count() < 2 {
            let frame = body
                .frame()
                .await
                .expect("the stream stays open")
                .expect("frame");
            if let Ok(data) = frame.into_data() {
                text.push_str(std::str::from_utf8(&data).expect("utf-8"));
            }
        }
        text
    };
    let text = tokio::time::timeout(Duration::from_secs(60), first_two)
        .await
        .expect("the events before the pause arrive during it");
    let events: Vec<Value> = text
        .split_terminator("\n\n")
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").expect("data event")).expect("JSON"))
        .collect();
    assert_eq!(events.len(), 2, "{text}");
    assert_first_event(&events[0]);
    assert_eq!(events[1]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(events[1]["choices"][0]["delta"]["content"], "");
}

#[tokio::test]
async fn non_stream_latency_is_applied() {
    let mut cfg = RegionConfig::new("eastus");
    cfg.latency = Latency {
        time_to_first_token: Duration::from_millis(10),
        per_token: Duration::from_millis(2),
        embeddings: Duration::from_millis(15),
    };
    let sim = start(cfg).await;
    let mut body = chat_body("hi");
    body["max_tokens"] = json!(5);
    // Lower bounds set by the simulator's sleeps (ttft + 5 tokens; the
    // embeddings latency): load can only lengthen them, never shorten.
    let t = std::time::Instant::now();
    let r = send(sim.addr(), Call::post(CHAT, body)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(20));

    let t = std::time::Instant::now();
    let r = send(sim.addr(), Call::post(EMBEDDINGS, json!({"input": "x"}))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(15));
}
