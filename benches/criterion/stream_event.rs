//! What the gateway does for every server-sent event of a streamed response,
//! per event: the usage scanner, the filter that removes the usage chunk
//! Sluice asked for, and the trace tally. Prints the heap allocations each
//! event costs (counted by an instrumented allocator) beside criterion's
//! time per event.

use std::alloc::System;

use bytes::Bytes;
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use sluice_tokens::{Encoding, UsageChunkFilter, UsageScanner};
use sluice_trace::record::Tally;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[path = "../tests/support/events.rs"]
mod events;

fn per_event(c: &mut Criterion) {
    sluice_tokens::preload(Encoding::O200kBase);
    let events: Vec<Bytes> = events::chat_stream(200);
    // Chunks as pingora hands them over: shared buffers, whose clones allocate nothing (the
    // first clone of a `Vec`-backed `Bytes` would).
    let _shared = events.clone();
    let mut g = c.benchmark_group("stream event");
    g.throughput(Throughput::Elements(events.len() as u64));
    let run = |events: &[Bytes], traced: bool| {
        let mut scanner = UsageScanner::new(true, Encoding::O200kBase, 10);
        let mut filter = UsageChunkFilter::new();
        let mut tally = traced.then(|| Tally::new(4096));
        for e in events {
            scanner.feed(e);
            if let Some(t) = tally.as_mut() {
                t.feed(e);
            }
            black_box(filter.feed(e.clone()));
        }
        black_box(scanner.finish());
    };
    for traced in [false, true] {
        let region = Region::new(GLOBAL);
        run(&events, traced);
        let allocs = region.change().allocations;
        eprintln!(
            "stream event (traced: {traced}): {:.2} allocations per event over {} events",
            allocs as f64 / events.len() as f64,
            events.len()
        );
        let name = if traced {
            "scanner + usage filter + trace tally"
        } else {
            "scanner + usage filter"
        };
        g.bench_function(name, |b| b.iter(|| run(&events, traced)));
    }
    g.finish();
}

criterion_group!(benches, per_event);
criterion_main!(benches);
