//! Issue #8's costs on the request path: the summary every request leaves in the ring, recording a traced
//! request's steps (with its redacted header lists), and building the `listTrace` JSON when it is read.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_trace::Section;
use sluice_trace::record::{Recorder, Redactor, Val};
use sluice_trace::summary::{Summary, SummaryRing};

fn headers() -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in [
        ("host", "gateway.example:8080"),
        ("user-agent", "AzureOpenAI/Python 1.99.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("content-length", "312"),
        ("api-key", "a-subscription-key-0123456789"),
        ("apim-debug-authorization", "eyJhbGciOiJIUzI1NiJ9.e30.sig"),
        ("x-stainless-lang", "python"),
        ("x-stainless-retry-count", "0"),
    ] {
        h.insert(k, v.parse().unwrap());
    }
    h
}

fn summary(api: &Arc<str>, sub: &Arc<str>, backend: &Arc<str>) -> Summary {
    Summary {
        at: SystemTime::now(),
        api: api.clone(),
        method: http::Method::POST,
        path: Box::from("/openai/deployments/gpt-4o/chat/completions"),
        subscription: Some(sub.clone()),
        deployment: Some(Box::from("gpt-4o")),
        backend: Some(backend.clone()),
        region: Some(backend.clone()),
        status: 200,
        prompt_tokens: Some(42),
        completion_tokens: Some(16),
        total_tokens: Some(58),
        latency: Duration::from_millis(12),
        stream: false,
        attempts: 1,
        trace_id: None,
    }
}

fn bench(c: &mut Criterion) {
    let ring = SummaryRing::new(10_000);
    let (api, sub, backend): (Arc<str>, Arc<str>, Arc<str>) = (
        Arc::from("azure-openai"),
        Arc::from("team-a"),
        Arc::from("eastus"),
    );
    c.bench_function("summary: push one into the ring (every request)", |b| {
        b.iter(|| ring.push(black_box(summary(&api, &sub, &backend))))
    });

    let redactor = Redactor::new(
        [http::HeaderName::from_static("ocp-apim-subscription-key")],
        ["subscription-key".to_string()],
    );
    let h = headers();
    c.bench_function(
        "trace: record a request (headers redacted) and 8 decisions",
        |b| {
            b.iter(|| {
                let mut r = Recorder::new(Instant::now());
                r.add(
                    Section::Inbound,
                    "api-inspector",
                    Val::obj([(
                        "request",
                        Val::obj([("headers", redactor.headers(black_box(&h)))]),
                    )]),
                );
                for _ in 0..8 {
                    r.add(
                        Section::Inbound,
                        "rate-limit",
                        Val::obj([
                            ("counterKey", Val::from("calls|sub:team-a".to_string())),
                            ("limit", 100u64.into()),
                            ("result", "accepted".into()),
                        ]),
                    );
                }
                black_box(r)
            })
        },
    );

    let mut full = Recorder::new(Instant::now());
    for section in [Section::Inbound, Section::Backend, Section::Outbound] {
        full.add(
            section,
            "api-inspector",
            Val::obj([("headers", redactor.headers(&h))]),
        );
        for _ in 0..6 {
            full.add(
                section,
                "step",
                Val::obj([
                    ("message", "A decision was made.".into()),
                    ("n", 1u64.into()),
                ]),
            );
        }
    }
    c.bench_function("listTrace: build and serialise a 21-entry trace", |b| {
        b.iter(|| {
            serde_json::to_vec(&black_box(&full).to_trace("sluice", "0123456789abcdef")).unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
