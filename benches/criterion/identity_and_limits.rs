//! Per-request costs of issue #3's steps: the JWT check (keys cached), each
//! limiter's reserve (+ reconcile), the prompt estimate, and the usage scan
//! of a streamed response.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::RsaPrivateKey;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::traits::PublicKeyParts;
use sluice_auth::{Fetch, JwtSettings, JwtValidator, KeysSource};
use sluice_limits::{CounterStore, Limit, MemoryStore, Period, SystemClock, Window};
use sluice_tokens::{Encoding, Operation, UsageScanner, estimate_request};

/// Serves one JWKS from memory (no network in the bench).
#[derive(Debug)]
struct MemoryJwks(Vec<u8>);

#[async_trait::async_trait]
impl Fetch for MemoryJwks {
    async fn get(&self, _url: &str) -> Result<Vec<u8>, String> {
        Ok(self.0.clone())
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn jwt(c: &mut Criterion) {
    let pem = include_str!("../../crates/sluice-auth/tests/fixtures/test_only_signing_a.pem");
    let key = RsaPrivateKey::from_pkcs1_pem(pem).expect("fixture key");
    let der = key.to_pkcs1_der().expect("der");
    let jwks = serde_json::json!({"keys": [{
        "kty": "RSA", "use": "sig", "kid": "k1",
        "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
    }]});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://login.microsoftonline.com/t/v2.0", "aud": "https://cognitiveservices.azure.com",
        "exp": now + 3600, "nbf": now - 10, "iat": now - 10, "azp": "app", "sub": "s", "roles": ["Caller"],
    });
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("k1".into());
    let encoding = EncodingKey::from_rsa_der(der.as_bytes());
    let sign = |jti: usize| {
        let mut c = claims.clone();
        c["jti"] = jti.into();
        format!(
            "Bearer {}",
            jsonwebtoken::encode(&header, &c, &encoding).expect("sign")
        )
    };
    let settings = JwtSettings {
        keys_source: KeysSource::Jwks("http://jwks.invalid/keys".into()),
        issuers: vec!["https://login.microsoftonline.com/t/v2.0".into()],
        audiences: vec!["https://cognitiveservices.azure.com".into()],
        client_application_ids: vec!["app".into()],
        required_roles: vec!["Caller".into()],
        clock_skew: Duration::from_secs(60),
        refetch_min_interval: Duration::from_secs(30),
    };
    let jwks = Arc::new(MemoryJwks(serde_json::to_vec(&jwks).expect("json")));
    let rt = runtime();
    // A caller reusing its token (the SDK keeps one for up to an hour): the
    // accepted-token cache answers.
    let v = JwtValidator::new(settings.clone(), jwks.clone());
    let bearer = sign(0);
    rt.block_on(v.validate(Some(&bearer))).expect("valid token");
    c.bench_function("jwt_validate_repeat_token", |b| {
        b.iter(|| rt.block_on(v.validate(Some(black_box(&bearer)))))
    });
    // Every token new (more distinct tokens than the cache holds): the full
    // check, RS256 signature included.
    let fresh: Vec<String> = (1..=5000).map(sign).collect();
    let v = JwtValidator::new(settings, jwks);
    let mut i = 0usize;
    c.bench_function("jwt_validate_new_token_rs256", |b| {
        b.iter(|| {
            i = (i + 1) % fresh.len();
            rt.block_on(v.validate(Some(black_box(&fresh[i]))))
        })
    });
}

fn limits(c: &mut Criterion) {
    let rt = runtime();
    let store = MemoryStore::new(Arc::new(SystemClock));
    let mut g = c.benchmark_group("limiter_reserve_reconcile");
    let cases = [
        (
            "rate_limit_sliding_60s",
            Window::Sliding(Duration::from_secs(60)),
        ),
        ("quota_fixed_1h", Window::Fixed(Duration::from_secs(3600))),
        ("token_quota_monthly", Window::Calendar(Period::Monthly)),
    ];
    for (name, window) in cases {
        let limit = Limit {
            limit: u64::MAX / 2,
            window,
        };
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let r = store
                        .reserve(black_box("calls|sub:team-a"), &limit, 1)
                        .await;
                    if let Ok(r) = r {
                        store.reconcile(&r, 1).await;
                    }
                })
            })
        });
    }
    g.finish();
}

fn tokens(c: &mut Criterion) {
    sluice_tokens::preload(Encoding::O200kBase);
    // Sluice's count-only vocabulary against tiktoken-rs's tokenizer, same texts, same run.
    let mut g = c.benchmark_group("count_text");
    let prose =
        "The quick brown fox jumps over the lazy dog near the canal.  It said: \"don't\"!\n";
    let mixed = "Ünïcödé 東京都の天気は晴れ 😀 12345 {\"k\": [1, 2]}\t\tend  \n";
    for (name, text) in [
        ("prose_1k", prose.repeat(12)),
        ("mixed_1k", mixed.repeat(14)),
    ] {
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(BenchmarkId::new("sluice", name), &text, |b, t| {
            b.iter(|| sluice_tokens::count_text(Encoding::O200kBase, black_box(t)))
        });
        let core = tiktoken_rs::o200k_base_singleton();
        g.bench_with_input(BenchmarkId::new("tiktoken-rs", name), &text, |b, t| {
            b.iter(|| core.encode_ordinary(black_box(t)).len())
        });
    }
    // Cold: 256 texts of 1 KiB of made-up words (xorshift), counted in turn. Tens of thousands of
    // distinct words go round, so the per-thread word cache (4,096 pieces) almost always misses,
    // as for a prompt of words the worker has not seen lately.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // Words of random letters (long merge chains), and words of two to four common English
    // syllables (English-looking, rarely the same twice).
    const SYLLABLES: [&str; 24] = [
        "con", "tion", "pro", "ment", "in", "er", "re", "al", "ing", "ed", "de", "com", "st", "ly",
        "un", "ter", "ver", "ble", "per", "ous", "ic", "at", "ex", "ful",
    ];
    let text_of = |word: &mut dyn FnMut(&mut String)| -> Vec<String> {
        (0..256)
            .map(|_| {
                let mut t = String::new();
                while t.len() < 1024 {
                    t.push(' ');
                    word(&mut t);
                }
                t
            })
            .collect()
    };
    let letters = text_of(&mut |t| {
        for _ in 0..3 + next() % 8 {
            t.push(char::from(b'a' + (next() % 26) as u8));
        }
    });
    let syllables = text_of(&mut |t| {
        for _ in 0..2 + next() % 3 {
            t.push_str(SYLLABLES[(next() % 24) as usize]);
        }
    });
    g.throughput(Throughput::Bytes(1024));
    let core = tiktoken_rs::o200k_base_singleton();
    for (name, texts) in [
        ("cold_letters_1k", &letters),
        ("cold_syllables_1k", &syllables),
    ] {
        let mut turn = 0;
        g.bench_function(BenchmarkId::new("sluice", name), |b| {
            b.iter(|| {
                turn = (turn + 1) % texts.len();
                sluice_tokens::count_text(Encoding::O200kBase, black_box(&texts[turn]))
            })
        });
        g.bench_function(BenchmarkId::new("tiktoken-rs", name), |b| {
            b.iter(|| {
                turn = (turn + 1) % texts.len();
                core.encode_ordinary(black_box(&texts[turn])).len()
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("prompt_estimate");
    for words in [50usize, 5_000] {
        let text =
            "The quick brown fox jumps over the lazy dog near the canal. ".repeat(words / 12);
        let body = serde_json::to_vec(&serde_json::json!({
            "messages": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": text}],
            "max_tokens": 64
        }))
        .expect("json");
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(body.len()), &body, |b, body| {
            b.iter(|| estimate_request(Operation::ChatCompletions, Some("gpt-4o"), black_box(body)))
        });
    }
    g.finish();
    // A 24-token Azure stream with the usage chunk, as the gateway sees it.
    let mut sse = String::from(
        "data: {\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[{\"prompt_index\":0,\"content_filter_results\":{}}]}\n\n",
    );
    for i in 0..24 {
        sse.push_str(&format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\" word{i}\"}},\"finish_reason\":null,\"index\":0}}],\"created\":1,\"id\":\"c\",\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"usage\":null}}\n\n"
        ));
    }
    sse.push_str("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":24,\"total_tokens\":34}}\n\ndata: [DONE]\n\n");
    let events: Vec<&[u8]> = sse.split_inclusive("\n\n").map(str::as_bytes).collect();
    c.bench_function("usage_scan_stream_24_events", |b| {
        b.iter(|| {
            let mut s = UsageScanner::new(true, Encoding::O200kBase, 10);
            for e in &events {
                s.feed(black_box(e));
            }
            s.finish()
        })
    });
}

/// A chat answer as Azure OpenAI sends it, read for its usage as it passes.
fn json_answer(c: &mut Criterion) {
    let content = "Paris is the capital of France, and it has been for most of the country's \
                   history; it is also its largest city, on the Seine, with about two million \
                   people in the city itself and twelve million in its metropolitan area.";
    let body = format!(
        r#"{{"choices":[{{"content_filter_results":{{"hate":{{"filtered":false,"severity":"safe"}},"self_harm":{{"filtered":false,"severity":"safe"}},"sexual":{{"filtered":false,"severity":"safe"}},"violence":{{"filtered":false,"severity":"safe"}}}},"finish_reason":"stop","index":0,"logprobs":null,"message":{{"annotations":[],"content":"{content}","refusal":null,"role":"assistant"}}}}],"created":1733000000,"id":"chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012","model":"gpt-4o-2024-11-20","object":"chat.completion","prompt_filter_results":[{{"prompt_index":0,"content_filter_results":{{"hate":{{"filtered":false,"severity":"safe"}},"jailbreak":{{"filtered":false,"detected":false}},"self_harm":{{"filtered":false,"severity":"safe"}},"sexual":{{"filtered":false,"severity":"safe"}},"violence":{{"filtered":false,"severity":"safe"}}}}}}],"system_fingerprint":"fp_b705f0c291","usage":{{"completion_tokens":48,"completion_tokens_details":{{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0}},"prompt_tokens":25,"prompt_tokens_details":{{"audio_tokens":0,"cached_tokens":0}},"total_tokens":73}}}}"#
    );
    let mut g = c.benchmark_group("usage_scan_json_answer");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function(BenchmarkId::from_parameter(body.len()), |b| {
        b.iter(|| {
            let mut s = UsageScanner::usage_only(false, Encoding::O200kBase, 10);
            s.feed(black_box(body.as_bytes()));
            s.finish()
        })
    });
    g.finish();
}

criterion_group!(benches, jwt, limits, tokens, json_answer);
criterion_main!(benches);
