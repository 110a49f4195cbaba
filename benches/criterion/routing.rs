//! Per-attempt costs of issue #7's backend selection: `select` over a small steering pool, `select` over two
//! priority groups with resting backends, and taking a headroom reading from a response's headers.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_routing::{BackendHealth, BreakerRule, Headroom, Member, Need, Outcome, Pool, select};

const MAX_AGE: Duration = Duration::from_secs(60);
const NOW: Duration = Duration::from_secs(1_000);

/// The rate-limit headers of a typical Azure OpenAI chat completion.
const HEADERS: &[(&str, &str)] = &[
    ("content-type", "application/json"),
    ("apim-request-id", "6c1f0a4e-6a57-4c54-9d2b-1a7a3b2f9e11"),
    ("x-ms-region", "Sweden Central"),
    ("x-ratelimit-remaining-requests", "899"),
    ("x-ratelimit-remaining-tokens", "149000"),
    ("x-ratelimit-reset-requests", "1s"),
    ("x-ratelimit-reset-tokens", "6m0s"),
    ("x-request-id", "a4b0c2d9-1f3e-4a8b-9c7d-5e6f7a8b9c0d"),
];

fn header(name: &str) -> Option<&'static str> {
    HEADERS
        .iter()
        .find(|(key, _)| *key == name)
        .map(|(_, value)| *value)
}

fn healths(n: usize) -> Vec<BackendHealth> {
    (0..n)
        .map(|_| BackendHealth::new(BreakerRule::defaults()))
        .collect()
}

fn members(priorities: &[u32]) -> Vec<Member> {
    priorities
        .iter()
        .enumerate()
        .map(|(backend, &priority)| Member {
            backend,
            priority,
            weight: 1 + u32::try_from(backend % 2).unwrap_or(0),
        })
        .collect()
}

fn routing(c: &mut Criterion) {
    let pool = Pool::new("chat", members(&[1, 1, 1]), true, MAX_AGE);
    let health = healths(3);
    for h in &health {
        h.headroom.observe(header, NOW, MAX_AGE);
    }
    let need = Need {
        tokens: Some(1_200),
    };
    c.bench_function("select_3_members_steering_headroom_known", |b| {
        b.iter(|| select(black_box(&pool), &health, black_box(need), &[], NOW))
    });

    let pool = Pool::new("chat", members(&[1, 1, 1, 2, 2, 2]), true, MAX_AGE);
    let health = healths(6);
    let throttled = Outcome::Status {
        status: 429,
        retry_after: Some(Duration::from_secs(30)),
    };
    for h in &health[..2] {
        h.breaker.record(&throttled, NOW);
    }
    c.bench_function("select_6_members_2_groups_2_open", |b| {
        b.iter(|| select(black_box(&pool), &health, black_box(need), &[], NOW))
    });

    let headroom = Headroom::default();
    c.bench_function("headroom_observe_azure_headers", |b| {
        b.iter(|| headroom.observe(black_box(header), black_box(NOW), MAX_AGE))
    });
}

criterion_group!(benches, routing);
criterion_main!(benches);
