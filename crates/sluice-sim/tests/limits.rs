//! Per-deployment TPM and request-rate limits over real HTTP.

mod common;

use common::*;
use http::StatusCode;
use serde_json::json;
use sluice_sim::{DeploymentConfig, RegionConfig};

fn chat_with_max(max_tokens: u64) -> serde_json::Value {
    let mut b = chat_body("hi"); // 1 + 4 + 3 = 8 prompt tokens
    b["max_tokens"] = json!(max_tokens);
    b
}

#[tokio::test]
async fn token_limit_gives_azure_429_with_headers() {
    let mut cfg = RegionConfig::new("swedencentral");
    cfg.default_tokens_per_minute = Some(10_000); // 10 requests per 10 s
    let sim = start(cfg).await;

    let r = send(sim.addr(), Call::post(CHAT, chat_with_max(4000))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("5992"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("9"));
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("10000"));
    let r = send(sim.addr(), Call::post(CHAT, chat_with_max(4000))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("1984"));

    let r = send(sim.addr(), Call::post(CHAT, chat_with_max(4000))).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    r.assert_azure_headers("Sweden Central");
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    let ms: u64 = r.header("retry-after-ms").unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs), "retry-after {secs}");
    assert!(
        ms <= secs * 1000 && ms > (secs - 1) * 1000,
        "{ms} vs {secs}"
    );
    assert_eq!(
        r.header("x-ratelimit-reset-tokens"),
        Some(secs.to_string().as_str())
    );
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("1984"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("8"));
    let v = r.json();
    assert_eq!(v["error"]["code"], "429");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with(
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version \
             2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. \
             Please retry after "
        ),
        "{msg}"
    );

    // A small request still fits.
    let r = send(sim.addr(), Call::post(CHAT, chat_with_max(10))).await;
    assert_eq!(r.status, StatusCode::OK);

    // Other deployments have their own window.
    let r = send(
        sim.addr(),
        Call::post(
            "/openai/deployments/other/chat/completions",
            chat_with_max(4000),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sim.requests_seen(), 5);
}

#[tokio::test]
async fn request_rate_limit_per_ten_seconds() {
    let mut cfg = RegionConfig::new("eastus");
    cfg.deployments.insert(
        "embed".into(),
        DeploymentConfig {
            model: None,
            tokens_per_minute: Some(2_000), // 2 requests per 10 s
        },
    );
    let sim = start(cfg).await;
    for _ in 0..2 {
        let r = send(sim.addr(), Call::post(EMBEDDINGS, json!({"input": "x"}))).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = send(sim.addr(), Call::post(EMBEDDINGS, json!({"input": "x"}))).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=10).contains(&secs));
    assert!(r.header("x-ratelimit-reset-requests").is_some());
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("Embeddings_Create Operation"), "{msg}");
    assert!(msg.contains("call rate limit"), "{msg}");

    // The chat deployment has no limit configured: no rate-limit headers.
    let r = send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("x-ratelimit-remaining-tokens").is_none());
}

#[tokio::test]
async fn unknown_api_version_in_message() {
    let mut cfg = RegionConfig::new("eastus");
    cfg.default_tokens_per_minute = Some(100);
    let sim = start(cfg).await;
    let path = "/openai/deployments/d/completions";
    let body = json!({"prompt": "x", "max_tokens": 100});
    assert_eq!(
        send(sim.addr(), Call::post(path, body.clone()))
            .await
            .status,
        StatusCode::OK
    );
    let r = send(sim.addr(), Call::post(path, body)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("Completions_Create Operation under Azure OpenAI API version unknown"),
        "{msg}"
    );
}
