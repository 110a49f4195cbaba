//! Response shapes, usage, routing, auth and common headers over real HTTP.

mod common;

use base64::Engine as _;
use common::*;
use http::StatusCode;
use serde_json::json;
use sluice_sim::{DeploymentConfig, RegionConfig};

fn region() -> RegionConfig {
    let mut cfg = RegionConfig::new("eastus");
    cfg.deployments.insert(
        "gpt-4o".into(),
        DeploymentConfig {
            model: Some("gpt-4o-2024-08-06".into()),
            tokens_per_minute: None,
        },
    );
    cfg
}

#[tokio::test]
async fn chat_completion_shape_and_usage() {
    let sim = start(region()).await;
    let r = send(sim.addr(), Call::post(CHAT, chat_body("Hello there!"))).await;
    assert_eq!(r.status, StatusCode::OK);
    r.assert_azure_headers("East US");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "gpt-4o-2024-08-06");
    assert!(v["system_fingerprint"].is_string());
    assert_eq!(v["prompt_filter_results"][0]["prompt_index"], 0);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "stop");
    assert!(choice["logprobs"].is_null());
    assert!(choice["content_filter_results"].is_object());
    let content = choice["message"]["content"].as_str().unwrap();
    assert_eq!(content.split(' ').count(), 24);
    // o200k: 3 per message + "user" (1) + "Hello there!" (3), + 3 to prime the reply.
    assert_eq!(v["usage"]["prompt_tokens"], 10);
    assert_eq!(v["usage"]["completion_tokens"], 24);
    assert_eq!(v["usage"]["total_tokens"], 34);
    assert_eq!(sim.requests_seen(), 1);
}

#[tokio::test]
async fn max_tokens_is_honoured() {
    let sim = start(region()).await;
    let mut body = chat_body("hi");
    body["max_tokens"] = json!(5);
    let v = send(sim.addr(), Call::post(CHAT, body)).await.json();
    assert_eq!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .split(' ')
            .count(),
        5
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);

    let mut body = chat_body("hi");
    body["max_completion_tokens"] = json!(40);
    let v = send(sim.addr(), Call::post(CHAT, body)).await.json();
    assert_eq!(v["usage"]["completion_tokens"], 40);
    assert_eq!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .split(' ')
            .count(),
        40
    );
}

#[tokio::test]
async fn legacy_completion_shape() {
    let sim = start(region()).await;
    let r = send(
        sim.addr(),
        Call::post(
            COMPLETIONS,
            json!({"prompt": "Once upon a time", "max_tokens": 7}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "davinci");
    let c = &v["choices"][0];
    assert_eq!(c["text"].as_str().unwrap().split(' ').count(), 7);
    assert_eq!(c["index"], 0);
    assert_eq!(c["finish_reason"], "length");
    assert!(c["logprobs"].is_null());
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], 11);
}

#[tokio::test]
async fn embeddings_float_and_base64() {
    let sim = start(region()).await;
    let r = send(
        sim.addr(),
        Call::post(EMBEDDINGS, json!({"input": ["abcd", "abcdefghi"]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "embed");
    // Counted with cl100k (every embedding model's tokenizer): 1 + 2.
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], 3);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["object"], "embedding");
    let floats: Vec<f64> = data[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(floats.len(), 1536);
    let norm: f64 = floats.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "norm {norm}");

    // The openai SDK default: base64 of little-endian f32s; same vector.
    let r = send(
        sim.addr(),
        Call::post(
            EMBEDDINGS,
            json!({"input": "abcd", "encoding_format": "base64"}),
        ),
    )
    .await;
    let v = r.json();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw.len(), 1536 * 4);
    let first = f32::from_le_bytes(raw[0..4].try_into().unwrap());
    assert!((f64::from(first) - floats[0]).abs() < 1e-6);

    let v = send(
        sim.addr(),
        Call::post(
            EMBEDDINGS,
            json!({"input": "x", "dimensions": 256, "encoding_format": "base64"}),
        ),
    )
    .await
    .json();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw.len(), 256 * 4);
}

#[tokio::test]
async fn v1_routes_take_the_deployment_from_the_body() {
    let sim = start(region()).await;
    let mut body = chat_body("hi");
    body["model"] = json!("gpt-4o");
    let v = send(sim.addr(), Call::post("/openai/v1/chat/completions", body))
        .await
        .json();
    assert_eq!(v["model"], "gpt-4o-2024-08-06");
    let v = send(
        sim.addr(),
        Call::post(
            "/openai/v1/embeddings",
            json!({"model": "e3", "input": "x", "dimensions": 4}),
        ),
    )
    .await
    .json();
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 4);
    let r = send(
        sim.addr(),
        Call::post(
            "/openai/v1/completions",
            json!({"model": "d", "prompt": "x"}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(
        sim.addr(),
        Call::post("/openai/v1/chat/completions", chat_body("hi")),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn double_slashes_and_missing_api_version_are_fine() {
    let sim = start(region()).await;
    let r = send(
        sim.addr(),
        Call::post(
            "//openai//deployments/gpt-4o//chat/completions",
            chat_body("hi"),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_paths_are_404_and_health_is_200() {
    let sim = start(region()).await;
    for path in [
        "/openai/deployments/x/images/variations",
        "/openai/models",
        "/openai",
        "/elsewhere",
    ] {
        let r = send(sim.addr(), Call::post(path, json!({}))).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        r.assert_azure_headers("East US");
        assert_eq!(
            r.json(),
            json!({"error": {"code": "404", "message": "Resource not found"}})
        );
    }
    let r = send(sim.addr(), Call::get(CHAT)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = send(sim.addr(), Call::get("/")).await;
    assert_eq!(r.status, StatusCode::OK);
    r.assert_azure_headers("East US");
    assert!(!r.body.is_empty());
}

#[tokio::test]
async fn bad_bodies_are_azure_400s() {
    let sim = start(region()).await;
    let cases = [
        (CHAT, None),
        (CHAT, Some(json!({"model": "x"}))),
        (
            CHAT,
            Some(json!({"messages": [{"content": "x"}], "max_tokens": "many"})),
        ),
        (COMPLETIONS, Some(json!({"messages": []}))),
        (EMBEDDINGS, Some(json!({"prompt": "x"}))),
        (EMBEDDINGS, Some(json!({"input": []}))),
        (CHAT, Some(json!([1, 2]))),
    ];
    for (path, body) in cases {
        let mut call = Call::post(path, json!(null));
        call.body = body.clone();
        let r = send(sim.addr(), call).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path} {body:?}");
        r.assert_azure_headers("East US");
        let v = r.json();
        assert_eq!(v["error"]["code"], "BadRequest");
        assert!(v["error"]["message"].as_str().unwrap().len() > 5);
    }
    // Invalid JSON text.
    let addr = sim.addr();
    let r = raw_post(addr, CHAT, "{not json").await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("\"BadRequest\""), "{r}");
}

/// Send a raw HTTP/1.1 request (to deliver a body that is not JSON).
async fn raw_post(addr: std::net::SocketAddr, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn api_key_is_enforced_when_configured() {
    let mut cfg = region();
    cfg.api_key = Some("backend-secret".into());
    let sim = start(cfg).await;

    let r = send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    r.assert_azure_headers("East US");
    let v = r.json();
    assert_eq!(v["error"]["code"], "401");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Access denied due to invalid subscription key")
    );

    let r = send(
        sim.addr(),
        Call::post(CHAT, chat_body("hi")).header("api-key", "client-key"),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(sim.last_request_headers().unwrap()["api-key"], "client-key");

    let r = send(
        sim.addr(),
        Call::post(CHAT, chat_body("hi")).header("api-key", "backend-secret"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sim.requests_seen(), 3);
    // The health endpoint needs no key and is not counted.
    assert_eq!(
        send(sim.addr(), Call::get("/")).await.status,
        StatusCode::OK
    );
    assert_eq!(sim.requests_seen(), 3);
}

#[tokio::test]
async fn client_request_id_is_echoed_and_ids_are_fresh() {
    let sim = start(region()).await;
    let a = send(
        sim.addr(),
        Call::post(CHAT, chat_body("hi")).header("x-ms-client-request-id", "abc-123"),
    )
    .await;
    assert_eq!(a.header("x-ms-client-request-id"), Some("abc-123"));
    let b = send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
    assert_eq!(b.header("x-ms-client-request-id"), None);
    assert_ne!(a.header("apim-request-id"), b.header("apim-request-id"));
    let h = sim.last_request_headers().unwrap();
    assert!(h.get("x-ms-client-request-id").is_none());
}

#[tokio::test]
async fn answers_carry_azures_headers() {
    let mut cfg = region();
    cfg.api_key = Some("backend-secret".into());
    let sim = start(cfg).await;
    let key = |c: Call<'static>| c.header("api-key", "backend-secret");
    let model_headers = [
        "x-ms-rai-invoked",
        "x-accel-buffering",
        "azureml-model-session",
    ];
    // A model's answer: the security headers and the model's own.
    let a = send(sim.addr(), key(Call::post(CHAT, chat_body("hi")))).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.header("strict-transport-security"),
        Some("max-age=31536000; includeSubDomains; preload")
    );
    assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(a.header("x-ms-rai-invoked"), Some("true"));
    assert_eq!(a.header("x-accel-buffering"), Some("no"));
    let session = a.header("azureml-model-session").unwrap().to_string();
    assert!(session.starts_with("s1m0-"), "{session}");
    // The session is the simulator's, not the call's.
    let b = send(sim.addr(), key(Call::post(CHAT, chat_body("again")))).await;
    assert_eq!(b.header("azureml-model-session"), Some(session.as_str()));
    // A refused call and a call that is not a model's: security headers only.
    let refused = send(
        sim.addr(),
        Call::post(CHAT, chat_body("hi")).header("api-key", "wrong"),
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let health = send(sim.addr(), Call::get("/")).await;
    for r in [&refused, &health] {
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        for name in model_headers {
            assert_eq!(r.header(name), None, "{name}");
        }
    }
}

#[tokio::test]
async fn control_endpoints() {
    let sim = start(region()).await;
    send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
    let r = send(sim.addr(), Call::get("/_sim/stats")).await;
    assert_eq!(
        r.json(),
        json!({"requests": 1, "realtime_sessions": 0, "realtime_sessions_total": 0})
    );

    let r = send(
        sim.addr(),
        Call::post("/_sim/fault", json!({"fault": "status=503", "times": 2})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    for _ in 0..2 {
        let r = send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    let r = send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
    assert_eq!(r.status, StatusCode::OK);

    send(
        sim.addr(),
        Call::post("/_sim/fault", json!({"fault": "status=500"})),
    )
    .await;
    let r = send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    send(
        sim.addr(),
        Call::post("/_sim/fault", json!({"fault": null})),
    )
    .await;
    let r = send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
    assert_eq!(r.status, StatusCode::OK);

    let r = send(
        sim.addr(),
        Call::post("/_sim/fault", json!({"fault": "explode"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = send(sim.addr(), Call::get("/_sim/stats")).await;
    assert_eq!(
        r.json(),
        json!({"requests": 6, "realtime_sessions": 0, "realtime_sessions_total": 0})
    );
}
