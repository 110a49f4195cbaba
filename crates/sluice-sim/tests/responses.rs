//! The Responses API over real HTTP: JSON and SSE answers, stored responses, chains through
//! `previous_response_id`, limits and faults, in-stream failures.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use serde_json::{Value, json};
use sluice_sim::{DeploymentConfig, Latency, RegionConfig};

const V1: &str = "/openai/v1/responses";
const CLASSIC: &str = "/openai/responses?api-version=2025-04-01-preview";

fn region(name: &str) -> RegionConfig {
    let mut cfg = RegionConfig::new(name);
    cfg.deployments.insert(
        "gpt-4o".into(),
        DeploymentConfig {
            model: Some("gpt-4o-2024-08-06".into()),
            tokens_per_minute: None,
        },
    );
    cfg
}

fn ask(input: Value) -> Value {
    json!({ "model": "gpt-4o", "input": input })
}

fn assert_id(id: &Value, prefix: &str) -> String {
    let id = id.as_str().unwrap_or_else(|| panic!("id {id}"));
    let hex = id
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{id} lacks {prefix}"));
    assert_eq!(hex.len(), 32, "{id}");
    assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    id.to_string()
}

fn output_text(response: &Value) -> String {
    response["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no output text: {response}"))
        .to_string()
}

async fn create(addr: std::net::SocketAddr, body: Value) -> Value {
    let r = send(addr, Call::post(V1, body)).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    r.json()
}

#[tokio::test]
async fn responses_json_shape_and_usage() {
    let sim = start(region("eastus")).await;
    let r = send(sim.addr(), Call::post(V1, ask(json!("Hello there!")))).await;
    assert_eq!(r.status, StatusCode::OK);
    r.assert_azure_headers("East US");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_id(&v["id"], "resp_");
    assert_eq!(v["object"], "response");
    assert!(v["created_at"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["status"], "completed");
    assert_eq!(v["model"], "gpt-4o-2024-08-06");
    assert!(v["previous_response_id"].is_null());
    assert!(v["instructions"].is_null());
    assert!(v["max_output_tokens"].is_null());
    assert!(v["error"].is_null());
    assert_eq!(v["store"], true);

    let output = v["output"].as_array().unwrap();
    assert_eq!(output.len(), 1);
    let item = &output[0];
    assert_eq!(item["type"], "message");
    assert_id(&item["id"], "msg_");
    assert_eq!(item["status"], "completed");
    assert_eq!(item["role"], "assistant");
    let part = &item["content"][0];
    assert_eq!(part["type"], "output_text");
    assert_eq!(part["annotations"], json!([]));
    let text = output_text(&v);
    assert!(text.starts_with("the lock gate"), "{text}");
    assert!(text.ends_with(" from eastus"), "{text}");

    // Counted as the same chat request would be: 3 + "user" (1) + "Hello there!" (3) + 3.
    let u = &v["usage"];
    assert_eq!(u["input_tokens"], 10);
    assert_eq!(u["input_tokens_details"], json!({ "cached_tokens": 0 }));
    assert_eq!(u["output_tokens"], 24);
    assert_eq!(u["output_tokens_details"], json!({ "reasoning_tokens": 0 }));
    assert_eq!(u["total_tokens"], 34);
    assert_eq!(sim.requests_seen(), 1);

    // The api-version path, with message items, instructions and an output budget.
    let body = json!({
        "model": "gpt-4o",
        "instructions": "Answer briefly.",
        "max_output_tokens": 8,
        "input": [
            { "role": "user", "content": [{ "type": "input_text", "text": "Hello there!" }] },
        ],
    });
    let r = send(sim.addr(), Call::post(CLASSIC, body)).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["instructions"], "Answer briefly.");
    assert_eq!(v["max_output_tokens"], 8);
    assert_eq!(v["usage"]["output_tokens"], 8);
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 10);
    assert!(output_text(&v).ends_with(" from eastus"));
}

#[tokio::test]
async fn responses_stream_event_order_ids_and_usage() {
    let sim = start(region("westeurope")).await;
    let mut body = ask(json!("Tell me a story"));
    body["stream"] = json!(true);
    body["max_output_tokens"] = json!(9);
    let s = send_streaming(sim.addr(), Call::post(V1, body)).await;
    assert_eq!(s.status, StatusCode::OK);
    assert_eq!(
        s.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(s.header("x-ms-region"), Some("West Europe"));

    let events = s.named_events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let deltas = names
        .iter()
        .filter(|n| **n == "response.output_text.delta")
        .count();
    assert!(deltas >= 3, "{names:?}");
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names, expected);
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["sequence_number"], i as u64, "{name}");
    }

    let created = &events[0].1["response"];
    let id = assert_id(&created["id"], "resp_");
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["output"], json!([]));
    assert!(created["usage"].is_null());
    assert_eq!(events[1].1["response"]["status"], "in_progress");

    let added = &events[2].1;
    assert_eq!(added["output_index"], 0);
    let item_id = assert_id(&added["item"]["id"], "msg_");
    assert_eq!(added["item"]["status"], "in_progress");
    assert_eq!(added["item"]["role"], "assistant");
    assert_eq!(events[3].1["part"]["type"], "output_text");
    assert_eq!(events[3].1["part"]["text"], "");

    let mut text = String::new();
    for (_, d) in events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
    {
        assert_eq!(d["item_id"], item_id.as_str());
        assert_eq!(d["output_index"], 0);
        assert_eq!(d["content_index"], 0);
        text.push_str(d["delta"].as_str().unwrap());
    }
    assert!(text.starts_with("the lock"), "{text}");
    assert!(text.ends_with(" from westeurope"), "{text}");
    let n = events.len();
    assert_eq!(events[n - 4].1["text"], text.as_str());
    assert_eq!(events[n - 3].1["part"]["text"], text.as_str());
    assert_eq!(events[n - 2].1["item"]["status"], "completed");
    assert_eq!(events[n - 2].1["item"]["id"], item_id.as_str());

    let done = &events[n - 1].1["response"];
    assert_eq!(done["id"], id.as_str());
    assert_eq!(done["status"], "completed");
    assert_eq!(output_text(done), text);
    assert_eq!(done["output"][0]["id"], item_id.as_str());
    // o200k: 3 per message + "user" (1) + "Tell me a story" (4), + 3.
    assert_eq!(done["usage"]["input_tokens"], 11);
    assert_eq!(done["usage"]["output_tokens"], 9);
    assert_eq!(done["usage"]["total_tokens"], 20);

    let raw: Vec<u8> = s.frames.iter().flat_map(|(_, b)| b.to_vec()).collect();
    assert!(!String::from_utf8(raw).unwrap().contains("[DONE]"));

    // Once the stream has ended, the stored response is the completed one.
    let r = send(sim.addr(), Call::get(&format!("{V1}/{id}"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.json(), done);
}

#[tokio::test]
async fn responses_stream_is_paced_like_chat() {
    let mut cfg = region("eastus");
    let ttft = Duration::from_millis(20);
    let per_token = Duration::from_millis(10);
    cfg.latency = Latency {
        time_to_first_token: ttft,
        per_token,
        embeddings: Duration::ZERO,
    };
    let sim = start(cfg).await;
    let mut body = ask(json!("hi"));
    body["stream"] = json!(true);
    body["max_output_tokens"] = json!(5);
    let s = send_streaming(sim.addr(), Call::post(V1, body)).await;
    let events = s.named_events();
    let deltas = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .count() as u32;
    assert!(deltas >= 3);
    // Lower bounds only (the simulator's own sleeps): load can only lengthen them.
    let (last_at, _) = s.frames.last().unwrap();
    assert!(*last_at - s.sent_at >= ttft + per_token * deltas);

    // Non-stream answers wait as long before the head arrives.
    let t = std::time::Instant::now();
    let r = send(sim.addr(), Call::post(V1, ask(json!("hi")))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(t.elapsed() >= ttft + per_token * 3);
}

#[tokio::test]
async fn previous_response_id_found_and_not_found() {
    let east = start(region("eastus")).await;
    let west = start(region("westus")).await;
    let first = create(east.addr(), ask(json!("Hello there!"))).await;
    let first_id = first["id"].as_str().unwrap().to_string();

    let mut body = ask(json!("Hello there!"));
    body["previous_response_id"] = json!(first_id);
    let second = create(east.addr(), body.clone()).await;
    assert_eq!(second["previous_response_id"], first_id.as_str());
    assert_ne!(second["id"], first["id"]);
    // The earlier turn (its input and answer) is part of the input now.
    let alone = first["usage"]["input_tokens"].as_u64().unwrap();
    let chained = second["usage"]["input_tokens"].as_u64().unwrap();
    assert!(chained > alone + 20, "{chained} vs {alone}");

    let not_found = |id: &str| {
        json!({ "error": {
            "message": format!("Previous response with id '{id}' not found."),
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found",
        } })
    };
    // Another region never saw it.
    let r = send(west.addr(), Call::post(V1, body.clone())).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    r.assert_azure_headers("West US");
    assert_eq!(r.json(), not_found(&first_id));
    // An id nobody created.
    let mut unknown = ask(json!("x"));
    unknown["previous_response_id"] = json!("resp_00000000000000000000000000000000");
    let r = send(east.addr(), Call::post(V1, unknown)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json(), not_found("resp_00000000000000000000000000000000"));
    // A deleted one.
    let r = send(east.addr(), Call::delete(&format!("{V1}/{first_id}"))).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(east.addr(), Call::post(CLASSIC, body)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json(), not_found(&first_id));
    // One created with store: false.
    let mut unstored = ask(json!("x"));
    unstored["store"] = json!(false);
    let v = create(east.addr(), unstored).await;
    assert_eq!(v["store"], false);
    let id = v["id"].as_str().unwrap();
    let mut follow = ask(json!("y"));
    follow["previous_response_id"] = json!(id);
    let r = send(east.addr(), Call::post(V1, follow)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = send(east.addr(), Call::get(&format!("{V1}/{id}"))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn stored_response_get_input_items_and_delete() {
    let sim = start(region("eastus")).await;
    let body = json!({
        "model": "gpt-4o",
        "input": [
            { "role": "developer", "content": "Be terse." },
            { "type": "message", "role": "user", "content": [{ "type": "input_text", "text": "Hi" }] },
        ],
    });
    let created = create(sim.addr(), body).await;
    let id = created["id"].as_str().unwrap().to_string();

    for base in [V1.to_string(), "/openai/responses".to_string()] {
        let r = send(sim.addr(), Call::get(&format!("{base}/{id}?api-version=x"))).await;
        assert_eq!(r.status, StatusCode::OK);
        r.assert_azure_headers("East US");
        assert_eq!(r.json(), created);
    }

    let r = send(sim.addr(), Call::get(&format!("{V1}/{id}/input_items"))).await;
    assert_eq!(r.status, StatusCode::OK);
    let list = r.json();
    assert_eq!(list["object"], "list");
    assert_eq!(list["has_more"], false);
    let data = list["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    // Newest first by default, as OpenAI lists them.
    assert_eq!(data[0]["role"], "user");
    assert_eq!(data[0]["content"][0]["text"], "Hi");
    assert_eq!(data[1]["role"], "developer");
    assert_eq!(
        data[1]["content"],
        json!([{ "type": "input_text", "text": "Be terse." }])
    );
    for item in data {
        assert_eq!(item["type"], "message");
        assert_id(&item["id"], "msg_");
    }
    assert_eq!(list["first_id"], data[0]["id"]);
    assert_eq!(list["last_id"], data[1]["id"]);
    let r = send(
        sim.addr(),
        Call::get(&format!("{V1}/{id}/input_items?order=asc&limit=1")),
    )
    .await;
    let page = r.json();
    assert_eq!(page["data"][0]["role"], "developer");
    assert_eq!(page["has_more"], true);

    let r = send(sim.addr(), Call::delete(&format!("{V1}/{id}"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json(),
        json!({ "id": id, "object": "response", "deleted": true })
    );
    let gone = json!({ "error": {
        "message": format!("Response with id '{id}' not found."),
        "type": "invalid_request_error",
        "param": null,
        "code": null,
    } });
    for call in [
        Call::get(&format!("{V1}/{id}")),
        Call::delete(&format!("{V1}/{id}")),
        Call::get(&format!("{V1}/{id}/input_items")),
    ] {
        let r = send(sim.addr(), call).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.json(), gone);
    }
}

fn failing_stream_body() -> Value {
    let mut body = ask(json!("Tell me a story"));
    body["stream"] = json!(true);
    body["max_output_tokens"] = json!(8);
    body
}

fn prefix_names() -> Vec<&'static str> {
    vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
    ]
}

#[tokio::test]
async fn responses_stream_fail_with_response_failed() {
    let sim = start(region("eastus")).await;
    let s = send_streaming(
        sim.addr(),
        Call::post(V1, failing_stream_body()).header("x-sim-stream-fail", "response.failed"),
    )
    .await;
    assert_eq!(s.status, StatusCode::OK);
    let events = s.named_events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected = prefix_names();
    expected.push("response.failed");
    assert_eq!(names, expected);
    let (_, failed) = events.last().unwrap();
    assert_eq!(failed["type"], "response.failed");
    assert_eq!(failed["sequence_number"], 6);
    let response = &failed["response"];
    assert_eq!(response["status"], "failed");
    assert_eq!(response["error"]["code"], "server_error");
    assert!(response["error"]["message"].as_str().unwrap().len() > 10);
    assert_eq!(response["id"], events[0].1["response"]["id"]);
    assert_eq!(output_text(response), "the lock");

    // The stored response failed too.
    let id = response["id"].as_str().unwrap();
    let r = send(sim.addr(), Call::get(&format!("{V1}/{id}"))).await;
    assert_eq!(r.json()["status"], "failed");
}

#[tokio::test]
async fn responses_stream_fail_with_error_event_and_region_filter() {
    let sim = start(region("eastus")).await;
    let s = send_streaming(
        sim.addr(),
        Call::post(V1, failing_stream_body())
            .header("x-sim-stream-fail", "error")
            .header("x-sim-fault-region", "westus, eastus"),
    )
    .await;
    assert_eq!(s.status, StatusCode::OK);
    let events = s.named_events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected = prefix_names();
    expected.push("error");
    assert_eq!(names, expected);
    let (_, error) = events.last().unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "server_error");
    assert!(error["param"].is_null());
    assert_eq!(error["sequence_number"], 6);
    assert!(error["message"].as_str().unwrap().len() > 10);

    // Aimed at another region: the stream completes.
    let s = send_streaming(
        sim.addr(),
        Call::post(V1, failing_stream_body())
            .header("x-sim-stream-fail", "error")
            .header("x-sim-fault-region", "westus"),
    )
    .await;
    let events = s.named_events();
    assert_eq!(events.last().unwrap().0, "response.completed");

    // An unknown value is a 400, as for x-sim-fault.
    let r = send(
        sim.addr(),
        Call::post(V1, failing_stream_body()).header("x-sim-stream-fail", "sometimes"),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn chat_stream_fail_sends_an_error_event_without_done() {
    let sim = start(RegionConfig::new("eastus")).await;
    let mut body = chat_body("Tell me a story");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(5);
    let s = send_streaming(
        sim.addr(),
        Call::post(CHAT, body.clone()).header("x-sim-stream-fail", "error"),
    )
    .await;
    assert_eq!(s.status, StatusCode::OK);
    let (events, done) = s.json_events();
    assert!(!done, "a failed stream has no [DONE]");
    // Azure's first event, the role chunk, two words, the error.
    assert_eq!(events.len(), 5, "{events:#?}");
    assert_eq!(events[2]["choices"][0]["delta"]["content"], "the");
    assert_eq!(events[3]["choices"][0]["delta"]["content"], " lock");
    let error = &events[4];
    assert_eq!(error["error"]["code"], "server_error");
    assert!(error["error"]["message"].as_str().unwrap().len() > 10);
    assert_eq!(error.as_object().unwrap().len(), 1, "{error}");

    // Without the header the same request completes.
    let s = send_streaming(sim.addr(), Call::post(CHAT, body)).await;
    let (events, done) = s.json_events();
    assert!(done);
    assert_eq!(events.len(), 1 + 1 + 5 + 1);
}

#[tokio::test]
async fn responses_validate_authenticate_limit_and_fault() {
    let mut cfg = region("eastus");
    cfg.api_key = Some("backend-secret".into());
    cfg.deployments.insert(
        "small".into(),
        DeploymentConfig {
            model: None,
            tokens_per_minute: Some(1_000),
        },
    );
    let sim = start(cfg).await;
    let key = |c: Call<'static>| c.header("api-key", "backend-secret");

    let r = send(sim.addr(), Call::post(V1, ask(json!("hi")))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"]["code"], "401");
    let r = send(
        sim.addr(),
        Call::post(V1, ask(json!("hi"))).header("authorization", "Bearer backend-secret"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);

    let r = send(sim.addr(), key(Call::post(V1, json!({ "input": "hi" })))).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let v = r.json();
    assert_eq!(v["error"]["param"], "model");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    for bad in [
        json!({ "model": "gpt-4o" }),
        json!({ "model": "gpt-4o", "input": 5 }),
        json!({ "model": "gpt-4o", "input": "x", "stream": "yes" }),
        json!([1]),
    ] {
        let r = send(sim.addr(), key(Call::post(V1, bad.clone()))).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
    }

    // The deployment's TPM limit applies as for chat: 1000 TPM, one request per 10 s.
    let small = json!({ "model": "small", "input": "hi", "max_output_tokens": 10 });
    let r = send(sim.addr(), key(Call::post(CLASSIC, small.clone()))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(r.json()["model"], "small");
    let r = send(sim.addr(), key(Call::post(CLASSIC, small))).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.header("retry-after").is_some());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.starts_with(
            "Requests to the Responses_Create Operation under Azure OpenAI API version \
             2025-04-01-preview"
        ),
        "{msg}"
    );

    // Header faults apply.
    let r = send(
        sim.addr(),
        key(Call::post(V1, ask(json!("hi")))).header("x-sim-fault", "status=503"),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let r = send(
        sim.addr(),
        key(Call::post(V1, ask(json!("hi")))).header("x-sim-fault", "throttle=2500"),
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), Some("3"));
    assert_eq!(sim.requests_seen(), 11);
}
