//! The scanner against real responses from the simulator (`sluice-sim`, Azure-shaped bodies and
//! SSE), read frame by frame as a proxy would see them.

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sluice_sim::{RegionConfig, SimHandle, Simulator};
use sluice_tokens::{
    Encoding, Operation, StreamFailure, StreamFailureKind, Usage, UsageChunkFilter, UsageScanner,
    UsageSource, encoding_for_model, estimate_request,
};
use tokio::net::TcpStream;

const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
const COMPLETIONS: &str =
    "/openai/deployments/gpt-35-turbo-instruct/completions?api-version=2024-10-21";
const EMBEDDINGS: &str =
    "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21";

async fn start() -> SimHandle {
    Simulator::start("127.0.0.1:0".parse().unwrap(), RegionConfig::new("t"))
        .await
        .expect("simulator starts")
}

/// A response as a proxy sees it: content type, and the body frames in order.
struct Captured {
    sse: bool,
    frames: Vec<Bytes>,
}

impl Captured {
    fn body(&self) -> Vec<u8> {
        self.frames.concat()
    }

    fn scan(&self, encoding: Encoding, prompt_estimate: u32) -> Option<(Usage, UsageSource)> {
        self.scanner(encoding, prompt_estimate).finish()
    }

    /// A scanner fed every frame (not finished).
    fn scanner(&self, encoding: Encoding, prompt_estimate: u32) -> UsageScanner {
        let mut s = UsageScanner::new(self.sse, encoding, prompt_estimate);
        for f in &self.frames {
            s.feed(f);
        }
        s
    }

    /// `data:` payloads of an SSE body, parsed independently of the scanner.
    fn events(&self) -> Vec<Value> {
        String::from_utf8(self.body())
            .unwrap()
            .split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }
}

async fn call(addr: SocketAddr, path: &str, body: &Value) -> Captured {
    call_with(addr, path, body, &[]).await
}

async fn call_with(
    addr: SocketAddr,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Captured {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = sender.send_request(req).await.expect("response");
    assert!(resp.status().is_success(), "{}", resp.status());
    let sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            frames.push(data);
        }
    }
    Captured { sse, frames }
}

fn reported(v: &Value) -> Option<(Usage, UsageSource)> {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Some((
        Usage {
            prompt_tokens: n("prompt_tokens"),
            completion_tokens: n("completion_tokens"),
            total_tokens: n("total_tokens"),
        },
        UsageSource::Reported,
    ))
}

fn chat_body(stream: bool, include_usage: bool) -> Value {
    let mut b = json!({
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about canals and sluice gates."},
        ],
        "max_tokens": 12,
    });
    if stream {
        b["stream"] = json!(true);
    }
    if include_usage {
        b["stream_options"] = json!({"include_usage": true});
    }
    b
}

#[tokio::test]
async fn json_chat_usage_matches_the_body() {
    let sim = start().await;
    let r = call(sim.addr(), CHAT, &chat_body(false, false)).await;
    assert!(!r.sse);
    let body: Value = serde_json::from_slice(&r.body()).unwrap();
    assert_eq!(r.scan(Encoding::O200kBase, 0), reported(&body["usage"]));
    assert_eq!(body["usage"]["completion_tokens"], 12);
}

#[tokio::test]
async fn json_embeddings_usage_matches_the_body() {
    let sim = start().await;
    let req = json!({"input": ["first text", "second, longer text"]});
    let r = call(sim.addr(), EMBEDDINGS, &req).await;
    let body: Value = serde_json::from_slice(&r.body()).unwrap();
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(r.scan(Encoding::Cl100kBase, 0), reported(&body["usage"]));
}

#[tokio::test]
async fn stream_with_usage_chunk_matches_the_simulator() {
    let sim = start().await;
    let req = chat_body(true, true);
    let est = estimate_request(
        Operation::ChatCompletions,
        Some("gpt-4o"),
        req.to_string().as_bytes(),
    );
    assert!(est.include_usage && est.prompt_tokens > 0);
    let r = call(sim.addr(), CHAT, &req).await;
    assert!(r.sse);
    let events = r.events();
    let usage_event = events.last().unwrap();
    assert_eq!(usage_event["choices"], json!([]));
    assert_eq!(
        r.scan(encoding_for_model("gpt-4o"), est.prompt_tokens),
        reported(&usage_event["usage"])
    );
    assert_eq!(usage_event["usage"]["completion_tokens"], 12);
}

#[tokio::test]
async fn stream_without_usage_is_counted_deterministically() {
    let sim = start().await;
    let req = chat_body(true, false);
    let est = estimate_request(
        Operation::ChatCompletions,
        Some("gpt-4o"),
        req.to_string().as_bytes(),
    );
    let first = call(sim.addr(), CHAT, &req).await;
    let second = call(sim.addr(), CHAT, &req).await;
    let events = first.events();
    assert!(events.iter().all(|e| e.get("usage").is_none()));
    let (usage, source) = first.scan(Encoding::O200kBase, est.prompt_tokens).unwrap();
    assert_eq!(source, UsageSource::Counted);
    assert_eq!(usage.prompt_tokens, u64::from(est.prompt_tokens));
    assert!(usage.completion_tokens > 0);
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
    assert_eq!(
        second.scan(Encoding::O200kBase, est.prompt_tokens),
        Some((usage, source))
    );
    // Re-chunking the same bytes does not change the count.
    let body = first.body();
    let mut s = UsageScanner::new(true, Encoding::O200kBase, est.prompt_tokens);
    for c in body.chunks(7) {
        s.feed(c);
    }
    assert_eq!(s.finish(), Some((usage, source)));
}

#[tokio::test]
async fn legacy_completion_streams() {
    let sim = start().await;
    let with_usage = json!({"prompt": "Once upon a time", "max_tokens": 5, "stream": true,
        "stream_options": {"include_usage": true}});
    let r = call(sim.addr(), COMPLETIONS, &with_usage).await;
    let events = r.events();
    assert_eq!(
        r.scan(Encoding::Cl100kBase, 0),
        reported(&events.last().unwrap()["usage"])
    );

    let without = json!({"prompt": "Once upon a time", "max_tokens": 5, "stream": true});
    let est = estimate_request(
        Operation::Completions,
        Some("gpt-35-turbo-instruct"),
        without.to_string().as_bytes(),
    );
    assert_eq!(est.prompt_tokens, 4);
    let r = call(sim.addr(), COMPLETIONS, &without).await;
    let (usage, source) = r.scan(Encoding::Cl100kBase, est.prompt_tokens).unwrap();
    assert_eq!(source, UsageSource::Counted);
    assert_eq!(usage.prompt_tokens, 4);
    // Each streamed word is at least one token.
    assert!(usage.completion_tokens >= 5, "{usage:?}");
}

const RESPONSES: &str = "/openai/v1/responses";

fn responses_body(stream: bool) -> Value {
    json!({
        "model": "gpt-4o",
        "instructions": "You are terse.",
        "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "Tell me about canals and sluice gates."}]}],
        "max_output_tokens": 12,
        "stream": stream,
    })
}

/// A Responses `usage` as a [`Usage`].
fn reported_responses(v: &Value) -> Option<(Usage, UsageSource)> {
    let n = |k: &str| v[k].as_u64().unwrap();
    Some((
        Usage {
            prompt_tokens: n("input_tokens"),
            completion_tokens: n("output_tokens"),
            total_tokens: n("total_tokens"),
        },
        UsageSource::Reported,
    ))
}

#[tokio::test]
async fn responses_json_usage_and_id_match_the_body() {
    let sim = start().await;
    let req = responses_body(false);
    let est = estimate_request(
        Operation::from_path(RESPONSES),
        None,
        req.to_string().as_bytes(),
    );
    assert!(est.prompt_tokens > 0);
    assert_eq!(est.max_completion_tokens, Some(12));
    let r = call(sim.addr(), RESPONSES, &req).await;
    assert!(!r.sse);
    let body: Value = serde_json::from_slice(&r.body()).unwrap();
    let s = r.scanner(Encoding::O200kBase, est.prompt_tokens);
    assert_eq!(s.object_id(), body["id"].as_str());
    assert!(s.object_id().unwrap().starts_with("resp"));
    assert_eq!(s.failure(), None);
    assert_eq!(
        r.scan(Encoding::O200kBase, est.prompt_tokens),
        reported_responses(&body["usage"])
    );
}

#[tokio::test]
async fn responses_stream_usage_id_and_failures() {
    let sim = start().await;
    let req = responses_body(true);
    let r = call(sim.addr(), RESPONSES, &req).await;
    assert!(r.sse);
    let events = r.events();
    let completed = events.last().unwrap();
    assert_eq!(completed["type"], "response.completed");
    let mut s = r.scanner(Encoding::O200kBase, 3);
    assert_eq!(s.object_id(), events[0]["response"]["id"].as_str());
    assert!(s.object_id().is_some());
    assert_eq!(s.failure(), None);
    assert_eq!(
        s.finish(),
        reported_responses(&completed["response"]["usage"])
    );
    // Cut before `response.completed`: counted from the text deltas, which the simulator
    // reports as the output tokens.
    let cut = r.body();
    let cut = &cut[..cut.len() - named_event_len(&r, "response.completed")];
    let mut c = UsageScanner::new(true, Encoding::O200kBase, 3);
    c.feed(cut);
    let (counted, source) = c.finish().unwrap();
    assert_eq!(source, UsageSource::Counted);
    assert_eq!(counted.prompt_tokens, 3);
    assert!(counted.completion_tokens > 0);

    // In-stream failures after the 200.
    for (header, kind) in [
        ("response.failed", StreamFailureKind::Failed),
        ("error", StreamFailureKind::Error),
    ] {
        let r = call_with(
            sim.addr(),
            RESPONSES,
            &req,
            &[("x-sim-stream-fail", header)],
        )
        .await;
        let s = r.scanner(Encoding::O200kBase, 3);
        assert_eq!(
            s.failure(),
            Some(&StreamFailure {
                kind,
                code: Some("server_error".into())
            }),
            "{header}"
        );
        assert!(s.object_id().is_some(), "{header}");
    }
}

/// The length of the (last) `event: kind` event of an SSE body with `\n` line endings.
fn named_event_len(r: &Captured, kind: &str) -> usize {
    let body = String::from_utf8(r.body()).unwrap();
    let start = body.rfind(&format!("event: {kind}\n")).unwrap();
    body.len() - start
}

#[tokio::test]
async fn chat_stream_failure_and_id() {
    let sim = start().await;
    let r = call(sim.addr(), CHAT, &chat_body(true, false)).await;
    let s = r.scanner(Encoding::O200kBase, 0);
    assert_eq!(s.failure(), None);
    let first_id = r.events().into_iter().find_map(|e| {
        e["id"]
            .as_str()
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
    });
    assert_eq!(s.object_id().map(str::to_owned), first_id);
    assert!(first_id.is_some());
    let r = call_with(
        sim.addr(),
        CHAT,
        &chat_body(true, false),
        &[("x-sim-stream-fail", "error")],
    )
    .await;
    let s = r.scanner(Encoding::O200kBase, 0);
    assert_eq!(s.failure().map(|f| f.kind), Some(StreamFailureKind::Error));
}

#[tokio::test]
async fn usage_chunk_filter_on_a_simulator_stream() {
    let sim = start().await;
    let r = call(sim.addr(), CHAT, &chat_body(true, true)).await;
    let mut filter = UsageChunkFilter::new();
    let mut out = Vec::new();
    for frame in &r.frames {
        out.extend_from_slice(&filter.feed(frame.clone()));
    }
    out.extend_from_slice(&filter.finish());
    let filtered = Captured {
        sse: true,
        frames: vec![Bytes::from(out)],
    };
    let mut expected = r.events();
    let usage_chunk = expected.pop().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert!(usage_chunk["usage"].is_object());
    assert_eq!(filtered.events(), expected);
    assert!(
        String::from_utf8(filtered.body())
            .unwrap()
            .ends_with("data: [DONE]\n\n")
    );
    // The usage read from the unfiltered stream is still the reported one.
    assert_eq!(
        r.scan(Encoding::O200kBase, 0),
        reported(&usage_chunk["usage"])
    );
}
