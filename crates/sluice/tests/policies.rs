//! The policies end to end under `cargo test` alone: token_limit (reserve
//! prompt + allowed completion, reconcile to the usage, hold under
//! concurrency), validate_jwt against a JWKS served on 127.0.0.1, and the
//! token metrics on the management listener. One in-process gateway serves
//! every test in this binary and is never stopped.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::post;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::RsaPrivateKey;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};
use sluice_sim::{RegionConfig, Simulator};

const KEY_A: &str = "policies-e2e-team-a-key";
const KEY_B: &str = "policies-e2e-team-b-key";
const KEY_C: &str = "policies-e2e-team-c-key";
const BACKEND_KEY: &str = "policies-e2e-backend-key";
const ISSUER: &str = "https://login.microsoftonline.com/tenant-e2e/v2.0";
const AUDIENCE: &str = "api://sluice-e2e";
const APP: &str = "app-e2e-0001";
const KID: &str = "e2e-key";
const TPM: u64 = 1000;
/// A test-only key (crates/sluice-auth/tests/fixtures/README.md).
const SIGNING_PEM: &str = include_str!("../../sluice-auth/tests/fixtures/test_only_signing_a.pem");
const OTHER_PEM: &str = include_str!("../../sluice-auth/tests/fixtures/test_only_other.pem");

struct Env {
    gw: SocketAddr,
    management: SocketAddr,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(start)
}

/// A JWKS document with the signing key, served to any GET on 127.0.0.1.
fn serve_jwks() -> String {
    let key = RsaPrivateKey::from_pkcs1_pem(SIGNING_PEM).expect("PEM");
    let jwks = json!({"keys": [{
        "kty": "RSA", "use": "sig", "kid": KID,
        "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
    }]})
    .to_string();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let _ = stream.set_nodelay(true);
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            // Read the request head; the JWKS is the answer to everything.
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let mut s = reader.into_inner();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{jwks}",
                jwks.len()
            );
        }
    });
    format!("http://{addr}/discovery/v2.0/keys")
}

fn start() -> Env {
    let rt = common::leaked_runtime();
    let mut region = RegionConfig::new("eastus");
    region.api_key = Some(BACKEND_KEY.into());
    region.latency.time_to_first_token = std::time::Duration::from_millis(100);
    let sim = rt
        .block_on(Simulator::start(
            "127.0.0.1:0".parse().expect("addr"),
            region,
        ))
        .expect("sim");
    let jwks = serve_jwks();
    // Removed when `start` returns: the config (its key files) is read
    // before the gateway serves.
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, value) in [
        ("a.key", KEY_A),
        ("b.key", KEY_B),
        ("c.key", KEY_C),
        ("backend.key", BACKEND_KEY),
    ] {
        std::fs::write(dir.path().join(name), value).expect("write");
    }
    let yaml = format!(
        r#"
server:
  listen: 127.0.0.1:0
  threads: 2
  management: {{ listen: 127.0.0.1:0 }}
backends:
  - name: eastus
    url: {sim}
    api_key: {{file: backend.key}}
subscriptions:
  - name: team-a
    primary_key: {{file: a.key}}
  - name: team-b
    primary_key: {{file: b.key}}
  - name: team-c
    primary_key: {{file: c.key}}
apis:
  - name: tokens
    path: /openai
    backends: [eastus]
    policies:
      - token_limit:
          counter_key: subscription
          tokens_per_minute: {TPM}
          remaining_tokens_header_name: x-remaining-tokens
          tokens_consumed_header_name: x-consumed-tokens
      - emit_token_metric: {{dimensions: [subscription, api, deployment]}}
  - name: entra
    path: /entra/openai
    backends: [eastus]
    auth: jwt
    policies:
      - validate_jwt:
          jwks_url: {jwks}
          issuers: [{ISSUER}]
          audiences: [{AUDIENCE}]
          client_application_ids: [{APP}]
      - token_limit: {{counter_key: identity, tokens_per_minute: 100000}}
      - emit_token_metric: {{dimensions: [api, identity]}}
"#,
        sim = sim.url(),
    );
    Box::leak(Box::new(sim));
    let listeners = common::serve_in_process(&yaml, dir.path());
    Env {
        gw: listeners.data,
        management: listeners.management.expect("management listener"),
    }
}

const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";

fn chat(max_tokens: u32) -> String {
    json!({"messages": [{"role": "user", "content": "Tell me about canal locks"}], "max_tokens": max_tokens})
        .to_string()
}

fn header_u64(r: &common::Resp, name: &str) -> u64 {
    r.header(name)
        .unwrap_or_else(|| panic!("no {name}: {:?}", r.headers))
        .parse()
        .expect("a number")
}

fn token(pem: &str, claims: Value) -> String {
    let der = RsaPrivateKey::from_pkcs1_pem(pem)
        .expect("PEM")
        .to_pkcs1_der()
        .expect("DER");
    let key = EncodingKey::from_rsa_der(der.as_bytes());
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(KID.to_string());
    jsonwebtoken::encode(&header, &claims, &key).expect("sign")
}

fn claims(aud: &str, exp_in: i64) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    json!({"iss": ISSUER, "aud": aud, "azp": APP, "sub": "user-1", "iat": now, "nbf": now - 5, "exp": now + exp_in})
}

fn metrics() -> String {
    common::metrics(env().management)
}

/// The sum of `metric` over the series whose labels contain every `want`.
fn metric_sum(text: &str, metric: &str, want: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[test]
fn token_limit_reserves_what_a_request_may_use_then_charges_what_it_used() {
    let e = env();
    // team-b is used by this test only.
    let a = post(e.gw, CHAT, &[("api-key", KEY_B)], &chat(20));
    assert_eq!(a.status, 200, "{}", a.text());
    let prompt = header_u64(&a, "x-consumed-tokens");
    assert!(prompt > 0);
    assert_eq!(header_u64(&a, "x-remaining-tokens"), TPM - prompt - 20);
    let used_a = a.json()["usage"]["total_tokens"].as_u64().expect("usage");
    assert_eq!(
        used_a,
        prompt + 20,
        "the simulator writes max_tokens tokens"
    );
    // The first call now counts what it used; the second holds its reservation.
    let b = post(e.gw, CHAT, &[("api-key", KEY_B)], &chat(10));
    assert_eq!(
        header_u64(&b, "x-remaining-tokens"),
        TPM - used_a - prompt - 10
    );
    // A request that could never fit: 400, not a 429 that waiting cannot cure.
    let c = post(e.gw, CHAT, &[("api-key", KEY_B)], &chat(TPM as u32));
    assert_eq!(c.status, 400, "{}", c.text());
    assert!(
        c.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("Waiting will not help"))
    );
    // The metrics count exactly the usage of the successful calls.
    let used_b = b.json()["usage"]["total_tokens"].as_u64().expect("usage");
    let text = metrics();
    assert_eq!(
        metric_sum(
            &text,
            "sluice_tokens_total",
            &[
                "subscription=\"team-b\"",
                "api=\"tokens\"",
                "deployment=\"gpt-4o\""
            ]
        ),
        used_a + used_b,
        "{text}"
    );
}

#[test]
fn token_limit_holds_under_concurrent_calls() {
    let e = env();
    let results: Vec<common::Resp> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|_| s.spawn(|| post(e.gw, CHAT, &[("api-key", KEY_A)], &chat(100))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let ok: Vec<&common::Resp> = results.iter().filter(|r| r.status == 200).collect();
    let refused: Vec<&common::Resp> = results.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok.len() + refused.len(), 20);
    assert!(!ok.is_empty() && !refused.is_empty());
    let used: u64 = ok
        .iter()
        .map(|r| r.json()["usage"]["total_tokens"].as_u64().expect("usage"))
        .sum();
    let one = ok
        .iter()
        .map(|r| r.json()["usage"]["total_tokens"].as_u64().expect("usage"))
        .max()
        .expect("one");
    assert!(
        used <= TPM + one,
        "{used} tokens used by {} calls",
        ok.len()
    );
    for r in refused {
        let secs: u64 = r
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .expect("secs");
        assert!((1..=60).contains(&secs));
        assert_eq!(
            r.json(),
            json!({"statusCode": 429, "message": format!("Token limit is exceeded. Try again in {secs} seconds.")})
        );
    }
}

#[test]
fn jwt_callers_are_checked_limited_and_measured() {
    let e = env();
    let path = format!("/entra{CHAT}");
    let good = token(SIGNING_PEM, claims(AUDIENCE, 3600));
    let r = post(
        e.gw,
        &path,
        &[("authorization", &format!("Bearer {good}"))],
        &chat(4),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let used = r.json()["usage"]["total_tokens"].as_u64().expect("usage");
    for (bearer, message) in [
        (
            token(SIGNING_PEM, claims("api://someone-else", 3600)),
            "audience",
        ),
        (token(SIGNING_PEM, claims(AUDIENCE, -3600)), "expired"),
        (token(OTHER_PEM, claims(AUDIENCE, 3600)), "signature"),
    ] {
        let r = post(
            e.gw,
            &path,
            &[("authorization", &format!("Bearer {bearer}"))],
            &chat(4),
        );
        assert_eq!(r.status, 401, "{}", r.text());
        let m = r.json()["message"]
            .as_str()
            .expect("message")
            .to_ascii_lowercase();
        assert!(m.contains(message), "{m}");
        assert!(!r.text().contains(&bearer));
    }
    // A subscription key does not open a JWT API.
    let r = post(e.gw, &path, &[("api-key", KEY_A)], &chat(4));
    assert_eq!(r.status, 401);
    let text = metrics();
    assert_eq!(
        metric_sum(
            &text,
            "sluice_tokens_total",
            &["api=\"entra\"", &format!("identity=\"app:{APP}\"")]
        ),
        used,
        "{text}"
    );
}

#[test]
fn bodies_that_stream_are_reserved_for_before_they_complete() {
    use common::Framing;
    let e = env();
    let send = |body: &str, framing| {
        common::request(
            e.gw,
            "POST",
            CHAT,
            &[("api-key", KEY_C), ("content-type", "application/json")],
            body.as_bytes(),
            framing,
        )
        .expect("request")
    };
    let big = |max_tokens: u32| {
        json!({"messages": [{"role": "user", "content": "canal water lock gate ".repeat(4000)}],
               "max_tokens": max_tokens})
        .to_string()
    };
    assert!(big(1).len() > 64 * 1024);
    // Chunked or over 64 KiB, the body streams to the backend; its max_tokens
    // still counts, read from a copy before the last bytes go out.
    for (body, framing) in [
        (chat(TPM as u32), Framing::Chunked),
        (big(TPM as u32), Framing::ContentLength),
    ] {
        let r = send(&body, framing);
        assert_eq!(r.status, 400, "{framing:?}: {}", r.text());
        assert!(
            r.json()["message"]
                .as_str()
                .is_some_and(|m| m.contains("Waiting will not help"))
        );
    }
    let small = send(&chat(30), Framing::Chunked);
    assert_eq!(small.status, 200, "{}", small.text());
    let prompt = header_u64(&small, "x-consumed-tokens");
    assert_eq!(header_u64(&small, "x-remaining-tokens"), TPM - prompt - 30);
    // A big prompt is estimated before the body completes: alone it is
    // larger than the limit.
    let r = send(&big(1), Framing::ContentLength);
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = r.json()["message"].as_str().expect("message").to_string();
    assert!(msg.contains("in the prompt"), "{msg}");
}
