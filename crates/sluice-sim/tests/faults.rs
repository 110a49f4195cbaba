//! Fault injection: handle, request header, control endpoint; each fault kind; shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use serde_json::json;
use sluice_sim::{Fault, RegionConfig};

#[tokio::test]
async fn status_fault_for_a_number_of_requests() {
    let sim = start(RegionConfig::new("eastus")).await;
    sim.set_fault(Fault::Status(503), Some(2));
    for _ in 0..2 {
        let r = send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        r.assert_azure_headers("East US");
        assert_eq!(
            r.json(),
            json!({"error": {"code": "ServiceUnavailable",
                             "message": "The server is currently unable to handle the request."}})
        );
    }
    let r = send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
    assert_eq!(r.status, StatusCode::OK);

    sim.set_fault(Fault::Status(429), None);
    for _ in 0..3 {
        let r = send(sim.addr(), Call::post(EMBEDDINGS, json!({"input": "x"}))).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.header("retry-after-ms"), Some("1000"));
        assert_eq!(r.json()["error"]["code"], "429");
    }
    sim.clear_fault();
    let r = send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sim.requests_seen(), 7);
}

#[tokio::test]
async fn hang_is_observed_as_a_client_timeout_until_shutdown() {
    let sim = start(RegionConfig::new("eastus")).await;
    sim.set_fault(Fault::Hang, Some(1));
    let addr = sim.addr();
    let res = tokio::time::timeout(
        Duration::from_millis(100),
        try_send(addr, Call::post(CHAT, chat_body("hi"))),
    )
    .await;
    assert!(res.is_err(), "hung request must time out on the client");
    assert_eq!(sim.requests_seen(), 1);
    // The fault was used up; the server still answers others.
    let r = send(addr, Call::post(CHAT, chat_body("hi"))).await;
    assert_eq!(r.status, StatusCode::OK);

    // A hanging request is released (with a connection error) when the server shuts down.
    let hung = tokio::spawn(try_send(
        addr,
        Call::post(CHAT, chat_body("hi")).header("x-sim-fault", "hang"),
    ));
    while sim.requests_seen() < 3 {
        tokio::task::yield_now().await;
    }
    sim.shutdown();
    let res = tokio::time::timeout(Duration::from_secs(10), hung)
        .await
        .expect("shutdown releases the hung request")
        .unwrap();
    assert!(res.is_err(), "{res:?}");
}

#[tokio::test]
async fn close_is_a_connection_error() {
    let sim = start(RegionConfig::new("eastus")).await;
    sim.set_fault(Fault::Close, Some(1));
    let err = try_send(sim.addr(), Call::post(CHAT, chat_body("hi")))
        .await
        .expect_err("connection closed without a response");
    assert!(err.is_incomplete_message() || err.is_closed(), "{err:?}");
    let r = send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn slow_first_byte_still_answers_correctly() {
    let sim = start(RegionConfig::new("eastus")).await;
    let delay = Duration::from_millis(60);
    sim.set_fault(Fault::SlowFirstByte(delay), Some(1));
    // The delay is a lower bound set by the simulator's own sleep, measured
    // from before the request was sent: load can only lengthen it.
    let t = Instant::now();
    let r = send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
    assert!(t.elapsed() >= delay);
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["object"], "chat.completion");

    // Via header, streaming.
    let mut body = chat_body("hi");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(2);
    let s = send_streaming(
        sim.addr(),
        Call::post(CHAT, body).header("x-sim-fault", "slow-first-byte=40"),
    )
    .await;
    assert_eq!(s.status, StatusCode::OK);
    assert!(s.frames[0].0 - s.sent_at >= Duration::from_millis(40));
    let (events, done) = s.json_events();
    assert!(done);
    assert_eq!(events.len(), 5);
}

#[tokio::test]
async fn header_fault_applies_to_one_request_and_respects_region() {
    let sim = start(RegionConfig::new("eastus")).await;
    let r = send(
        sim.addr(),
        Call::post(CHAT, chat_body("hi")).header("x-sim-fault", "status=500"),
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    r.assert_azure_headers("East US");
    assert_eq!(r.json()["error"]["code"], "InternalServerError");

    let r = send(sim.addr(), Call::post(CHAT, chat_body("hi"))).await;
    assert_eq!(r.status, StatusCode::OK);

    // Aimed at another region: ignored here.
    let r = send(
        sim.addr(),
        Call::post(CHAT, chat_body("hi"))
            .header("x-sim-fault", "status=500")
            .header("x-sim-fault-region", "westus"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(
        sim.addr(),
        Call::post(CHAT, chat_body("hi"))
            .header("x-sim-fault", "status=502")
            .header("x-sim-fault-region", "eastus"),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);

    let err = try_send(
        sim.addr(),
        Call::post(CHAT, chat_body("hi")).header("x-sim-fault", "close"),
    )
    .await;
    assert!(err.is_err());

    let r = send(
        sim.addr(),
        Call::post(CHAT, chat_body("hi")).header("x-sim-fault", "nonsense"),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn keep_alive_connection_survives_errors_and_faults_target_openai_only() {
    let sim = start(RegionConfig::new("eastus")).await;
    sim.set_fault(Fault::Status(503), None);
    // Health and control endpoints are not affected by faults.
    assert_eq!(
        send(sim.addr(), Call::get("/")).await.status,
        StatusCode::OK
    );
    let r = send(sim.addr(), Call::get("/_sim/fault")).await;
    assert_eq!(r.json(), json!({"fault": "status=503", "times": null}));
    assert_eq!(sim.requests_seen(), 0);
    sim.clear_fault();
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let sim = start(RegionConfig::new("eastus")).await;
    let addr = sim.addr();
    assert_eq!(send(addr, Call::get("/")).await.status, StatusCode::OK);
    sim.shutdown();
    // Once the accept loop has ended, connections are refused; until then none is served.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(_) => break,
            Ok(stream) => {
                drop(stream);
                assert!(Instant::now() < deadline, "listener still open");
                tokio::task::yield_now().await;
            }
        }
    }
}
