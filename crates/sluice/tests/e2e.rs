//! End-to-end tests: the gateway and simulated regions in this process, on
//! 127.0.0.1 port 0, driven over real HTTP. One gateway serves every test in
//! this binary and is never stopped (stopping in-process pingora servers can
//! abort the test process; see shared/reference/pingora.md §5.4).

mod common;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Capture, Framing, closed_port, post, request, sse_data};
use sluice_sim::{RegionConfig, SimHandle, Simulator};

const KEY: &str = "key-team-a-0123456789";
const KEY2: &str = "key-team-a-secondary-9876";
const BACKEND_KEY: &str = "backend-secret-key-for-sim";
const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
const PER_TOKEN_MS: u64 = 40;

struct Env {
    gw: SocketAddr,
    main: SimHandle,
    capture: Capture,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(start)
}

fn start() -> Env {
    let rt = common::leaked_runtime();
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut main_cfg = RegionConfig::new("main");
    main_cfg.display_region = "East US".into();
    main_cfg.api_key = Some(BACKEND_KEY.into());
    main_cfg.default_tokens_per_minute = Some(10_000_000);
    let main = rt.block_on(Simulator::start(any, main_cfg)).expect("sim");
    let mut slow_cfg = RegionConfig::new("slow");
    slow_cfg.display_region = "Sweden Central".into();
    slow_cfg.api_key = Some(BACKEND_KEY.into());
    slow_cfg.latency.time_to_first_token = Duration::from_millis(50);
    slow_cfg.latency.per_token = Duration::from_millis(PER_TOKEN_MS);
    let slow = rt.block_on(Simulator::start(any, slow_cfg)).expect("sim");
    let capture = Capture::start();
    let blackhole = blackhole();

    // Removed when `start` returns: the config (its key files) is read
    // before the gateway serves.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a.key"), KEY).expect("write");
    std::fs::write(dir.path().join("a2.key"), KEY2).expect("write");
    std::fs::write(dir.path().join("backend.key"), BACKEND_KEY).expect("write");
    let yaml = format!(
        r#"
server:
  listen: 127.0.0.1:0
  threads: 2
  max_request_body_bytes: 2000000
backends:
  - name: main
    url: {main}
    api_key: {{file: backend.key}}
  - name: main-short
    url: {main}
    api_key: {{file: backend.key}}
    timeouts: {{ read_ms: 700 }}
  - name: slow
    url: {slow}
    api_key: {{file: backend.key}}
  - name: capture
    url: http://{capture}/base
    api_key: {{file: backend.key}}
    deployments: {{ gpt-4o: gpt-4o-eu }}
  - name: dead
    url: http://127.0.0.1:{dead}
    timeouts: {{ connect_ms: 500 }}
  - name: blackhole
    url: http://{blackhole}
    timeouts: {{ connect_ms: 400 }}
subscriptions:
  - name: team-a
    primary_key: {{file: a.key}}
    secondary_key: {{file: a2.key}}
apis:
  - name: azure-openai
    path: /openai
    backends: [main]
  - name: slow
    path: /slow/openai
    backends: [slow]
  - name: capture
    path: /capture/openai
    backends: [capture]
  - name: small
    path: /small/openai
    backends: [capture]
    max_request_body_bytes: 1000
  - name: short
    path: /short/openai
    backends: [main-short]
  - name: dead
    path: /dead/openai
    backends: [dead]
  - name: blackhole
    path: /blackhole/openai
    backends: [blackhole]
"#,
        main = main.url(),
        slow = slow.url(),
        capture = capture.addr,
        dead = closed_port(),
        blackhole = blackhole,
    );
    let gw = common::serve_in_process(&yaml, dir.path()).data;
    Env { gw, main, capture }
}

/// A listener whose accept queue is full and never drained: new connections
/// to it are neither accepted nor refused, so connecting times out.
fn blackhole() -> SocketAddr {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    s.listen(0).expect("listen");
    let addr = s.local_addr().expect("addr").as_socket().expect("inet");
    // Fill the queue (backlog 0 admits one or two); keep everything open.
    let mut held = Vec::new();
    for _ in 0..4 {
        if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            held.push(c);
        }
    }
    Box::leak(Box::new((s, held)));
    addr
}

fn chat_body(stream: &str) -> String {
    format!(r#"{{"messages":[{{"role":"user","content":"Hello there"}}],"max_tokens":8{stream}}}"#)
}

#[test]
fn chat_completion_with_key_has_usage_and_azure_headers() {
    let e = env();
    let r = post(e.gw, CHAT, &[("api-key", KEY)], &chat_body(""));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(r.header("x-ms-stream"), Some("False"));
    assert_eq!(r.header("x-ms-region"), Some("East US"));
    assert!(r.header("apim-request-id").is_some());
    assert!(r.header("x-ratelimit-remaining-tokens").is_some());
    assert!(r.header("x-ratelimit-remaining-requests").is_some());
}

#[test]
fn secondary_key_and_ocp_header_and_query_key_are_accepted() {
    let e = env();
    let r = post(
        e.gw,
        CHAT,
        &[("Ocp-Apim-Subscription-Key", KEY2)],
        &chat_body(""),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let path = format!("{CHAT}&subscription-key={KEY}");
    let r = post(e.gw, &path, &[], &chat_body(""));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn missing_key_gets_apim_401() {
    let e = env();
    let r = post(e.gw, CHAT, &[], &chat_body(""));
    assert_eq!(r.status, 401);
    assert_eq!(r.reason, "Access Denied");
    assert_eq!(
        r.text(),
        "{ \"statusCode\": 401, \"message\": \"Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API.\" }"
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.header("www-authenticate"),
        Some(
            format!(
                "AzureApiManagementKey realm=\"http://{}/openai\",name=\"api-key\",type=\"header\"",
                e.gw
            )
            .as_str()
        )
    );
    assert_eq!(r.header("x-ms-stream"), None);
}

#[test]
fn invalid_key_gets_apim_401() {
    let e = env();
    for key in ["wrong", "key-team-a-012345678", "key-team-a-01234567890"] {
        let r = post(e.gw, CHAT, &[("api-key", key)], &chat_body(""));
        assert_eq!(r.status, 401);
        assert_eq!(
            r.json()["message"],
            "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription."
        );
    }
    let r = post(
        e.gw,
        &format!("{CHAT}&subscription-key=nope"),
        &[],
        &chat_body(""),
    );
    assert_eq!(r.status, 401);
}

#[test]
fn client_credentials_never_reach_the_backend() {
    let e = env();
    let path = format!(
        "/capture/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21&subscription-key={KEY}&x=1"
    );
    let r = post(
        e.gw,
        &path,
        &[
            ("x-test-id", "creds"),
            ("Authorization", "Bearer client-token"),
            ("Ocp-Apim-Subscription-Key", KEY),
        ],
        &chat_body(""),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let c = e.capture.find("creds").expect("captured");
    // Path renamed for this backend, base path kept, query intact minus the key.
    assert_eq!(
        c.target,
        "/base/openai/deployments/gpt-4o-eu/chat/completions?api-version=2024-10-21&x=1"
    );
    assert_eq!(c.header("api-key"), Some(BACKEND_KEY));
    assert_eq!(c.header("authorization"), None);
    assert_eq!(c.header("ocp-apim-subscription-key"), None);
    assert_eq!(c.header("host"), Some(e.capture.addr.to_string().as_str()));
    assert_eq!(c.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(c.body, chat_body("").as_bytes());
    // Backend headers pass through.
    assert_eq!(r.header("x-ms-region"), Some("Capture Region"));
    assert_eq!(r.header("apim-request-id"), Some("0000-capture"));
    assert_eq!(r.header("retry-after-ms"), Some("5"));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("700"));

    // The client's key under the name the backend's own key goes out
    // under, twice: the backend's key replaces every value of it.
    let r = post(
        e.gw,
        &path,
        &[
            ("x-test-id", "creds-twice"),
            ("api-key", KEY),
            ("API-Key", "another-client-secret"),
        ],
        &chat_body(""),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let c = e.capture.find("creds-twice").expect("captured");
    let keys: Vec<&str> = c
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("api-key"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(keys, [BACKEND_KEY]);
    assert_eq!(c.header("ocp-apim-subscription-key"), None);
}

#[test]
fn the_simulator_sees_only_the_backend_key() {
    let e = env();
    let r = post(
        e.gw,
        CHAT,
        &[("api-key", KEY), ("x-test-marker", "sim-key")],
        &chat_body(""),
    );
    assert_eq!(r.status, 200);
    let h = e.main.last_request_headers().expect("seen");
    assert_eq!(
        h.get("api-key").and_then(|v| v.to_str().ok()),
        Some(BACKEND_KEY)
    );
}

#[test]
fn v1_paths_are_forwarded() {
    let e = env();
    let r = post(
        e.gw,
        "/capture/openai/v1/chat/completions?api-version=preview",
        &[("api-key", KEY), ("x-test-id", "v1")],
        r#"{"model":"gpt-4o","messages":[]}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        e.capture.find("v1").expect("captured").target,
        "/base/openai/v1/chat/completions?api-version=preview"
    );
    let r = post(
        e.gw,
        "/openai/v1/chat/completions",
        &[("api-key", KEY)],
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "chat.completion");
}

#[test]
fn x_ms_stream_follows_the_body_like_apim() {
    let e = env();
    let cases = [
        (r#"{"stream":true}"#, "True"),
        (r#"{"stream":"TRUE"}"#, "True"),
        (r#"{"stream":false}"#, "False"),
        (r#"{"stream":null}"#, "False"),
        (r#"{"messages":[{"stream":true}]}"#, "False"),
        (r#"{}"#, "False"),
        ("not json", "False"),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let id = format!("xms-{i}");
        let r = post(
            e.gw,
            "/capture/openai/deployments/d/chat/completions",
            &[("api-key", KEY), ("x-test-id", &id)],
            body,
        );
        assert_eq!(r.header("x-ms-stream"), Some(*want), "body {body}");
        // The body reached the backend byte for byte.
        assert_eq!(e.capture.find(&id).expect("captured").body, body.as_bytes());
    }
}

#[test]
fn large_and_chunked_bodies_stream_through_with_x_ms_stream() {
    let e = env();
    let filler = "x".repeat(200 * 1024);
    let body = format!(r#"{{"messages":[{{"role":"user","content":"{filler}"}}],"stream":true}}"#);
    for (framing, id) in [
        (Framing::ContentLength, "big-cl"),
        (Framing::Chunked, "big-chunked"),
    ] {
        let r = request(
            e.gw,
            "POST",
            "/capture/openai/deployments/d/chat/completions",
            &[
                ("api-key", KEY),
                ("x-test-id", id),
                ("content-type", "application/json"),
            ],
            body.as_bytes(),
            framing,
        )
        .expect("request");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-ms-stream"), Some("True"));
        assert_eq!(e.capture.find(id).expect("captured").body.len(), body.len());
    }
    // A small chunked body too.
    let r = request(
        e.gw,
        "POST",
        "/capture/openai/deployments/d/chat/completions",
        &[("api-key", KEY), ("x-test-id", "small-chunked")],
        br#"{"stream":true}"#,
        Framing::Chunked,
    )
    .expect("request");
    assert_eq!(r.header("x-ms-stream"), Some("True"));
}

#[test]
fn streaming_events_arrive_in_order_and_complete() {
    let e = env();
    let r = post(
        e.gw,
        "/slow/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        &[("api-key", KEY)],
        &chat_body(r#","stream":true,"stream_options":{"include_usage":true}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ms-stream"), Some("True"));
    assert_eq!(
        r.header("content-type"),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(r.header("x-ms-region"), Some("Sweden Central"));
    let events = sse_data(&r.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let first: serde_json::Value = serde_json::from_str(&events[0]).expect("json");
    assert_eq!(first["choices"], serde_json::json!([]));
    assert!(first.get("prompt_filter_results").is_some());
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).expect("json");
    assert_eq!(usage["usage"]["completion_tokens"], 8);
    // Every event, once, in Azure's order: prompt filter, role, 8 words,
    // finish, usage, [DONE]. (That events are relayed as they come, not
    // buffered, is proven without timing in promises.rs.)
    assert_eq!(events.len(), 13, "{events:?}");
    let words: String = events[2..10]
        .iter()
        .map(|ev| {
            let v: serde_json::Value = serde_json::from_str(ev).expect("json");
            v["choices"][0]["delta"]["content"]
                .as_str()
                .expect("a word")
                .to_string()
        })
        .collect();
    assert_eq!(words.split_whitespace().count(), 8, "{words}");
}

#[test]
fn bodies_over_the_limit_get_413() {
    let e = env();
    let body = format!(r#"{{"prompt":"{}"}}"#, "y".repeat(2000));
    for framing in [Framing::ContentLength, Framing::Chunked] {
        let r = request(
            e.gw,
            "POST",
            "/small/openai/deployments/d/completions",
            &[("api-key", KEY)],
            body.as_bytes(),
            framing,
        )
        .expect("request");
        assert_eq!(r.status, 413, "{framing:?}: {}", r.text());
        assert_eq!(r.json()["statusCode"], 413);
    }
    // Server-wide limit (2 MB) with a large Content-Length: rejected before reading.
    let big = vec![b'z'; 2_100_000];
    let r = request(
        e.gw,
        "POST",
        CHAT,
        &[("api-key", KEY)],
        &big,
        Framing::ContentLength,
    )
    .expect("request");
    assert_eq!(r.status, 413);
}

#[test]
fn unknown_paths_get_404() {
    let e = env();
    for path in ["/", "/foo", "/openaix/deployments", "/status"] {
        let r = request(
            e.gw,
            "GET",
            path,
            &[("api-key", KEY)],
            b"",
            Framing::ContentLength,
        )
        .expect("request");
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(
            r.text(),
            "{ \"statusCode\": 404, \"message\": \"Resource not found\" }"
        );
    }
    let r = request(
        e.gw,
        "GET",
        "/status-0123456789abcdef",
        &[],
        b"",
        Framing::ContentLength,
    )
    .expect("request");
    assert_eq!(r.status, 200);
}

#[test]
fn refused_backend_gets_502() {
    let e = env();
    let r = post(
        e.gw,
        "/dead/openai/deployments/d/embeddings",
        &[("api-key", KEY)],
        r#"{"input":"a"}"#,
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["statusCode"], 502);
    // Refused at once, not timed out: a 502 naming the refusal, not a 504.
    assert!(
        r.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("ConnectRefused")),
        "{}",
        r.text()
    );
}

#[test]
fn hanging_backend_gets_504_after_the_read_timeout() {
    let e = env();
    let r = post(
        e.gw,
        "/short/openai/deployments/gpt-4o/chat/completions",
        &[("api-key", KEY), ("x-sim-fault", "hang")],
        &chat_body(""),
    );
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["statusCode"], 504);
    assert!(!r.text().contains(BACKEND_KEY));
}

#[test]
fn closed_connection_gets_502_and_slow_first_byte_still_works() {
    let e = env();
    let r = post(
        e.gw,
        CHAT,
        &[("api-key", KEY), ("x-sim-fault", "close")],
        &chat_body(""),
    );
    assert_eq!(r.status, 502, "{}", r.text());
    let r = post(
        e.gw,
        CHAT,
        &[("api-key", KEY), ("x-sim-fault", "slow-first-byte=300")],
        &chat_body(""),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ms-stream"), Some("False"));
}

#[test]
fn backend_errors_pass_through_untouched() {
    let e = env();
    // The API's only backend: nothing to fail over to, so its own answers
    // reach the client. (A 503 first: one does not trip its breaker; the
    // 429 does, and then the backend rests for its Retry-After.)
    let r = post(
        e.gw,
        CHAT,
        &[("api-key", KEY), ("x-sim-fault", "status=503")],
        &chat_body(""),
    );
    assert_eq!(r.status, 503);
    assert!(r.json()["error"].is_object());
    let r = post(
        e.gw,
        CHAT,
        &[("api-key", KEY), ("x-sim-fault", "status=429")],
        &chat_body(""),
    );
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    assert!(r.header("retry-after-ms").is_some());
    assert!(
        r.json()["error"]["code"].is_string(),
        "Azure's shape, not APIM's"
    );
    assert_eq!(r.header("x-ms-stream"), Some("False"));
}

#[test]
fn embeddings_are_forwarded() {
    let e = env();
    let r = post(
        e.gw,
        "/openai/deployments/only-this/embeddings",
        &[("api-key", KEY)],
        r#"{"input":["a","b"]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"].as_array().map(Vec::len), Some(2));
}

/// Sends a request to `path` with `Expect: 100-continue` (and `extra`, whole
/// header lines), checks that `100 Continue` comes before the body is sent,
/// then sends `body` and returns the rest of what the gateway answered.
fn post_after_continue(gw: std::net::SocketAddr, path: &str, extra: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(gw).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\napi-key: {KEY}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .expect("write");
    let mut first = [0u8; 64];
    let n = s
        .read(&mut first)
        .expect("100 Continue arrives without the body being sent");
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );
    s.write_all(body.as_bytes()).expect("write body");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    String::from_utf8_lossy(&rest).into_owned()
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_read() {
    let e = env();
    let text = post_after_continue(e.gw, CHAT, "", &chat_body(""));
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    assert!(text.contains("chat.completion"), "{text}");
}

/// The client's `Expect` was answered by the gateway, which read the body
/// before routing: the backend gets the body, never the `Expect`.
#[test]
fn an_answered_expect_does_not_reach_the_backend() {
    let e = env();
    let body = chat_body("");
    let text = post_after_continue(
        e.gw,
        "/capture/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        "x-test-id: expect\r\n",
        &body,
    );
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    let c = e.capture.find("expect").expect("captured");
    assert_eq!(c.header("expect"), None);
    assert_eq!(c.header("api-key"), Some(BACKEND_KEY));
    assert_eq!(c.body, body.as_bytes());
}

#[test]
fn a_huge_declared_body_is_refused_without_waiting_for_it() {
    use std::io::{Read, Write};
    let e = env();
    let mut s = std::net::TcpStream::connect(e.gw).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\napi-key: {KEY}\r\nContent-Length: 100000000\r\n\r\n{{\"mess"
    )
    .expect("write");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("\"statusCode\": 413"), "{text}");
}

#[test]
fn an_early_401_is_read_whole_then_the_connection_closes() {
    use std::io::{Read, Write};
    let e = env();
    let body = chat_body("");
    // A refused request with a body: the client that sent it all reads the
    // whole answer (no reset), then the connection is closed.
    let mut s = std::net::TcpStream::connect(e.gw).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\napi-key: wrong\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let (head, text) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(text.contains("invalid subscription key"), "{text}");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).expect("closed cleanly, not reset");
    assert!(rest.is_empty());

    // A refused request without a body keeps its connection.
    let mut s = std::net::TcpStream::connect(e.gw).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    for (key, want) in [("wrong", "401"), (KEY, "200")] {
        let (body, len) = if want == "401" {
            ("", 0)
        } else {
            (body.as_str(), body.len())
        };
        write!(
            s,
            "POST {CHAT} HTTP/1.1\r\nHost: x\r\napi-key: {key}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n{body}"
        )
        .expect("write");
        let (head, text) = read_response(&mut s);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {want}")),
            "{head} {text}"
        );
    }
}

#[test]
fn a_backend_that_never_accepts_gets_504_after_the_connect_timeout() {
    let e = env();
    let t = Instant::now();
    let r = post(
        e.gw,
        "/blackhole/openai/deployments/d/embeddings",
        &[("api-key", KEY)],
        r#"{"input":"a"}"#,
    );
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains("connect"),
        "{}",
        r.text()
    );
    assert!(t.elapsed() >= Duration::from_millis(400));
}

#[test]
fn a_failure_after_100_continue_still_gets_an_apim_error() {
    use std::io::{Read, Write};
    let e = env();
    let body = r#"{"input":"a"}"#;
    let mut s = std::net::TcpStream::connect(e.gw).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "POST /dead/openai/deployments/d/embeddings HTTP/1.1\r\nHost: x\r\napi-key: {KEY}\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .expect("write");
    let mut first = [0u8; 64];
    let n = s.read(&mut first).expect("read");
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 100"));
    s.write_all(body.as_bytes()).expect("body");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&first[..n]).into_owned() + &String::from_utf8_lossy(&rest);
    assert!(text.contains("HTTP/1.1 502"), "{text}");
    assert!(text.contains("\"statusCode\": 502"), "{text}");
}

#[test]
fn dot_segments_are_refused_before_reaching_a_backend() {
    let e = env();
    for path in [
        "/capture/openai/../language/analyze",
        "/capture/openai/deployments/%2e%2e/%2E%2E/x",
        "/capture/openai/deployments/a%2f..%2fb/chat/completions",
    ] {
        let r = post(e.gw, path, &[("api-key", KEY), ("x-test-id", "dots")], "{}");
        assert_eq!(r.status, 404, "{path}: {}", r.text());
    }
    assert!(e.capture.find("dots").is_none(), "nothing was forwarded");
}

/// Read one response head (and its Content-Length body) from a raw socket.
fn read_response(s: &mut std::net::TcpStream) -> (String, String) {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn an_unknown_caller_is_refused_before_its_body_is_read() {
    use std::io::Write;
    let e = env();
    for key in ["", "api-key: not-a-valid-key\r\n"] {
        let mut s = std::net::TcpStream::connect(e.gw).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        // Headers only: the 100 KB body the head announces is never sent.
        write!(
            s,
            "POST {CHAT} HTTP/1.1\r\nHost: x\r\n{key}Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        )
        .expect("write");
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
        assert!(body.contains("subscription key"), "{body}");
        // The body was never read: the gateway closes the connection.
        assert!(
            head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
    }
}

#[test]
fn an_unknown_caller_waiting_for_100_continue_gets_the_401_and_no_continue() {
    use std::io::Write;
    let e = env();
    let mut s = std::net::TcpStream::connect(e.gw).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "POST {CHAT} HTTP/1.1\r\nHost: x\r\napi-key: wrong\r\nContent-Type: application/json\r\nContent-Length: 50\r\nExpect: 100-continue\r\n\r\n"
    )
    .expect("write");
    let (head, body) = read_response(&mut s);
    assert!(
        head.starts_with("HTTP/1.1 401"),
        "no 100 Continue first: {head}"
    );
    assert!(body.contains("invalid subscription key"), "{body}");
    // Nothing follows: the connection is closed.
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}
