//! Hot-path costs per request: routing, the subscription-key check, the
//! `stream` probe on request bodies of several sizes, and the error body.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use sluice_config::{Api, Secret, Subscription, SubscriptionSettings};
use sluice_policy::error::error_body;
use sluice_policy::{ApiRouter, SubscriptionIndex, stream_flag};

fn settings() -> SubscriptionSettings {
    // api-key, then Ocp-Apim-Subscription-Key; query subscription-key.
    SubscriptionSettings::default()
}

fn subscription_check(c: &mut Criterion) {
    let mut g = c.benchmark_group("subscription_key");
    for n in [10usize, 10_000] {
        let subs: Vec<Subscription> = (0..n)
            .map(|i| Subscription {
                name: format!("team-{i}"),
                primary_key: Secret::new(format!("{i:032x}-primary")),
                secondary_key: Some(Secret::new(format!("{i:032x}-secondary"))),
                active: true,
                apis: None,
            })
            .collect();
        let idx = SubscriptionIndex::new(&subs);
        let s = settings();
        let mut good = HeaderMap::new();
        good.insert(
            "api-key",
            HeaderValue::from_str(&format!("{:032x}-primary", n / 2)).unwrap(),
        );
        let mut bad = HeaderMap::new();
        bad.insert(
            "api-key",
            HeaderValue::from_static("0000000000000000000000000000dead-primary"),
        );
        g.bench_with_input(BenchmarkId::new("valid", n), &good, |b, h| {
            b.iter(|| idx.check("azure-openai", &s, black_box(h), None))
        });
        g.bench_with_input(BenchmarkId::new("invalid", n), &bad, |b, h| {
            b.iter(|| idx.check("azure-openai", &s, black_box(h), None))
        });
    }
    g.finish();
}

fn stream_probe(c: &mut Criterion) {
    let mut g = c.benchmark_group("stream_flag");
    for size in [300usize, 8 * 1024, 64 * 1024] {
        let filler = "lorem ipsum ".repeat(size / 12);
        let body = format!(
            r#"{{"messages":[{{"role":"system","content":"You are helpful."}},{{"role":"user","content":"{filler}"}}],"max_tokens":64,"stream":true}}"#
        );
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(body.len()),
            body.as_bytes(),
            |b, body| b.iter(|| stream_flag(black_box(body))),
        );
    }
    g.finish();
}

fn routing_and_errors(c: &mut Criterion) {
    let apis: Vec<Api> = [
        "/openai",
        "/team-a/openai",
        "/team-b/openai",
        "/inference/openai",
    ]
    .iter()
    .enumerate()
    .map(|(i, p)| Api {
        name: format!("api-{i}"),
        path: p.to_string(),
        backends: vec!["b".into()],
        pool: "api/b".into(),
        deployment_pools: Default::default(),
        models: vec![],
        failover: sluice_config::Failover::default(),
        subscription: settings(),
        max_request_body_bytes: 1 << 22,
        websocket_idle: std::time::Duration::from_secs(600),
        auth: sluice_config::ApiAuth::Key,
        policies: vec![],
    })
    .collect();
    let router = ApiRouter::new(&apis);
    c.bench_function("route", |b| {
        b.iter(|| {
            router.route(black_box(
                "/inference/openai/deployments/gpt-4o/chat/completions",
            ))
        })
    });
    c.bench_function("error_body_401", |b| {
        b.iter(|| {
            error_body(
                black_box(401),
                "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription.",
            )
        })
    });
}

criterion_group!(
    benches,
    subscription_check,
    stream_probe,
    routing_and_errors
);
criterion_main!(benches);
